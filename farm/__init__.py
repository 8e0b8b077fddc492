"""farm: a production SMTP server farm with an aiosmtpd-compatible asyncio engine."""

from farm.smtp.version import __version__

__all__ = ["__version__"]
