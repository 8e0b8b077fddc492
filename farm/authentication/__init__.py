"""Sender authentication (``[authentication]``): SPF, DKIM, ARC and DMARC into one
Authentication-Results header (RFC 8601), with pyspf, dkimpy and the dmarc package."""

from farm.authentication.stage import DMARC_MODES, AuthenticationStage, Results

__all__ = ["DMARC_MODES", "AuthenticationStage", "Results"]
