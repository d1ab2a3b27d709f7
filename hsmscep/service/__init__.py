"""The SCEP operations: the only layer that awaits both the signing pool and the store.

`ports` declares what it needs from the store and the keys (typing.Protocol); the concrete
objects are injected by the web layer. May import protocol, policy, store.records, hsm.pool,
the webhook client and errors; never starlette, aiosqlite or pkcs11.
"""
