"""Test support that ships with the package: a small SCEP client built on the same pure
protocol code (tests and the benchmark; `client` gathers its names, cacerts, requests, replies
and pkcs7 hold the parts), and software keys for the key port (softkeys, in-process tests).

Not used by the server. May import hsmscep.protocol and hsmscep.errors.
"""
