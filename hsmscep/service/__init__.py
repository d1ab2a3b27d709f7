"""The SCEP operations: the only layer that awaits both the signing pool and the store.

`scep.ScepService` is the facade; a pkiMessage flows one way through enrollment (renewal,
authorization, pending), issuing and replies (the signing-worker jobs). `ports` declares what
it needs from the store and keys (Protocols). May import protocol, policy, store.records,
hsm.pool, the webhook client and errors; never starlette, aiosqlite or pkcs11.
"""
