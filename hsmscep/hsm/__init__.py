"""The HSM edge: the PKCS#11 adapter (library, pkcs11errors, login, tokenkeys, keyops; cryptoki
gathers their names), each worker's keys (keyring), the signing worker pool (pool), the
development token (devtoken), and key/token names (refs, pure).

Only hsm/ modules import python-pkcs11. May import hsmscep.protocol and hsmscep.errors.
"""
