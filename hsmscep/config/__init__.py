"""Settings: one TOML file plus HSMSCEP_* environment variables, read and checked once.

Never loads a PKCS#11 module or an HTTP client. May import protocol, policy, hsm.refs and
errors.
"""
