"""hsmscep: an HSM-backed SCEP server (RFC 8894)."""

__version__ = "0.1.0"
