"""Issuance policy: CSR checks, certificate templates, profiles, challenges, renewal, CRLs
and the webhook wire format -- every decision about what to issue, as plain functions.

Pure: no I/O, no clock (`now` is an argument). May import hsmscep.protocol and hsmscep.errors.
"""
