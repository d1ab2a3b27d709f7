"""The store edge: issued certificates, revocations and CRLs, held requests and one-time
challenges. `records` holds the values (pure); `sqlite` is the embedded backend with its
group-commit thread (`groupcommit`).

Backends implement hsmscep.service.ports.Store; they may import only hsmscep.errors and
store.records.
"""
