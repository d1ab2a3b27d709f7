"""SCEP and CMS on the wire (RFC 8894, RFC 5652): DER reading, the pkiMessage, envelopes,
CertRep building, algorithms and the HSM-backed `cryptography` key classes.

Pure: no I/O, no clock, no randomness of its own (nonces and times are arguments). May import
only hsmscep.errors, the standard library, cryptography and asn1crypto.
"""
