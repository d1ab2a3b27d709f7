"""The HSM edge: the PKCS#11 adapter (library: module initialisation; login: tokens, the one
login per token, sessions; tokenkeys: key objects; keyops: signing and decryption keys;
pkcs11errors: PKCS11Error -> HsmError), each worker's keys (keyring), the signing worker pool
(pool) and its run-time growth (autosize), the development token (devtoken), and key/token
names (refs, pure).

Only hsm/ modules import python-pkcs11. May import hsmscep.protocol and hsmscep.errors.
"""
