"""A small SCEP client built on the same pure protocol code, for tests and the benchmark:
`client` gathers its names; cacerts, requests, replies and pkcs7 hold the parts.

Not used by the server. May import hsmscep.protocol and hsmscep.errors.
"""
