"""The HTTP edge and the process model: the Starlette app and its lifespan (wiring), SCEP
transport, admin API, HTTP protocol limits, connection balancing and CPU affinity.

The only place that knows status codes. May import everything but hsmscep.cli.
"""
