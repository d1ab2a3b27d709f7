"""Benchmark harness: hsmscep against micromdm scepserver, and against the raw HSM."""
