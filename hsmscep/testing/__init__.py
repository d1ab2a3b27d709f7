"""A small SCEP client built on the same pure protocol code, for tests and the benchmark.

Not used by the server. May import hsmscep.protocol and hsmscep.errors.
"""
