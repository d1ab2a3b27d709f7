"""The HSM edge: the PKCS#11 adapter (cryptoki), each worker's keys (keyring), the signing
worker pool (pool), the development token (devtoken), and key/token names (refs, pure).

Only hsm.cryptoki imports python-pkcs11. May import hsmscep.protocol and hsmscep.errors.
"""
