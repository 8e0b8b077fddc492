"""farm: a production SMTP server farm with an aiosmtpd-compatible asyncio engine."""

__version__ = "0.1.0"
