"""A serial collision between two nodes on one PostgreSQL database is retried, not failed.

Two in-process apps (tests/inprocess.py: the real app, lifespan, pool and store, with software
keys) share one database; node B's serial source is made to repeat a serial node A issued.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import start_blocking_portal

from hsmscep.testing.cacerts import parse_ca_certs
from hsmscep.web.app import create_app
from tests.inprocess import SoftCa, _PortalTransport, _with_state, soft_ca
from tests.pgcluster import PASSWORD, Cluster
from tests.test_enroll import PKI_MESSAGE, issued_cert, new_request


@contextmanager
def node(ca: SoftCa, url: str) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    """inprocess.serve on the shared database, also handing out the lifespan state."""
    store = replace(ca.settings.store, url=url, password=PASSWORD)
    app = create_app(replace(ca.settings, store=store), keys=ca.keys)
    with start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(app.router.lifespan_context(app)) as state:
            asgi = httpx.ASGITransport(app=_with_state(app, state), client=("127.0.0.1", 50000))
            transport = _PortalTransport(portal, asgi)
            with httpx.Client(transport=transport, base_url="http://127.0.0.1") as http:
                yield http, dict(state or {})


def enroll(http: httpx.Client, ca: SoftCa, cn: str) -> int:
    ca_certs = parse_ca_certs(http.get("/scep", params={"operation": "GetCACert"}).content)
    request = new_request(ca_certs, ca.challenge, cn=cn, key_index=4)
    response = http.post(
        "/scep?operation=PKIOperation", content=request.der, headers={"Content-Type": PKI_MESSAGE}
    )
    return int(issued_cert(response, request, ca_certs).serial_number)


def test_serial_taken_by_the_other_node_is_retried(pg_cluster: Cluster, tmp_path: Path) -> None:
    pg_cluster.fresh_database("serials")
    url = pg_cluster.tcp_url("serials")
    ca = soft_ca(tmp_path / "ca", "pgserial")
    with node(ca, url) as (a, _), node(ca, url) as (b, b_state):
        taken = enroll(a, ca, "first")
        # Node B's next serial is the one node A just stored, then fresh ones.
        replies = b_state["services"]["default"]._pending.issuing.replies
        fresh = replies._new_serial
        drawn: list[int] = []

        def colliding(now: datetime) -> int:
            drawn.append(taken if not drawn else fresh(now))
            return drawn[-1]

        replies._new_serial = colliding
        second = enroll(b, ca, "second")
    assert drawn[0] == taken and len(drawn) == 2  # one collision, one retry
    assert second == drawn[1] != taken
