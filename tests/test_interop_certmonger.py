"""certmonger against a real server: its daemon driven by getcert, and its scep-submit helper.

One certmonger daemon per module (tests/certmonger.py: no D-Bus, its own state, libfaketime so
that its own poll of a PENDING request comes within seconds). The server, its SoftHSM2 token
and SQLite store are real; so are the requests and answers. The tests run in file order: the
last one rolls the CA over.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.certmonger import SCEP_SUBMIT, Certmonger, helper_certs, scep_submit, start, stop
from tests.conftest import DevCa, Server, make_ca, openssl_serial, start_server

pytestmark = pytest.mark.interop

CHALLENGE_FILE = "challenge"
EXTRA = f"""
[profiles.held]
approval = "manual"
challenge_file = "{CHALLENGE_FILE}"

[profiles.newkey]
challenge_file = "{CHALLENGE_FILE}"
renewal_requires_new_key = true

[profiles.getonly]
challenge_file = "{CHALLENGE_FILE}"
caps = ["SHA-256", "SHA-512", "AES", "DES3", "SCEPStandard"]
"""


@pytest.fixture(scope="module")
def cca(softhsm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    return make_ca(softhsm_dir, tmp_path_factory.mktemp("certmonger"), "cm-ca", extra_config=EXTRA)


@dataclass
class Served:
    """The module's server; the rollover test restarts it on the same port."""

    server: Server
    port: int


@pytest.fixture(scope="module")
def served(cca: DevCa) -> Iterator[Served]:
    srv = start_server(cca)
    holder = Served(srv, int(srv.url.rsplit(":", 1)[1]))
    yield holder
    holder.server.stop()
    assert "Traceback" not in holder.server.output()


@pytest.fixture(scope="module")
def certmonger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certmonger]:
    daemon = start(tmp_path_factory.mktemp("certmonger-daemon"))
    yield daemon
    stop(daemon)


@pytest.fixture(scope="module")
def cas(certmonger: Certmonger, served: Served) -> dict[str, str]:
    """certmonger CAs for the default profile, the held profile and the GET-only profile."""
    urls = {
        "hsmscep": f"{served.server.url}/scep",
        "held": f"{served.server.url}/scep/held",
        "getonly": f"{served.server.url}/scep/getonly",
        "newkey": f"{served.server.url}/scep/newkey",
    }
    for name, url in urls.items():
        if name == "getonly":
            # The same helper, verbose: curl's trace in the daemon log shows the method.
            helper = f"{SCEP_SUBMIT} -v -v -u {url}"
            added = certmonger.getcert("add-ca", "-c", name, "-e", helper)
        else:
            added = certmonger.getcert("add-scep-ca", "-c", name, "-u", url)
        assert added.returncode == 0, added.stdout + added.stderr
    return urls


def request(cm: Certmonger, ca: str, request_id: str, challenge: str, cn: str) -> tuple[Path, Path]:
    cert, key = cm.directory / f"{request_id}.crt", cm.directory / f"{request_id}.key"
    done = cm.getcert(
        "request", "-c", ca, "-f", str(cert), "-k", str(key), "-N", f"CN={cn}",
        "-L", challenge, "-I", request_id,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return cert, key


def audit_lines(srv: Server) -> list[dict[str, object]]:
    lines = []
    for line in srv.output().splitlines():
        start = line.find('{"event": "pki_operation"')
        if start >= 0:
            lines.append(json.loads(line[start:]))
    return lines


def issued(ca: DevCa, cert_path: Path, cn: str, ca_pem: Path | None = None) -> x509.Certificate:
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_pem or ca.settings.ca.cert), str(cert_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={cn}"
    return cert


def pending_cli(ca: DevCa, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "pending", *args, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_enroll_over_post(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    cert_path, _ = request(certmonger, "hsmscep", "post", cca.challenge, "cm-post")
    fields = certmonger.wait("post", "MONITORING", "CA_REJECTED", "CA_UNREACHABLE")
    assert fields["status"] == "MONITORING", fields
    cert = issued(cca, cert_path, "cm-post")
    [line] = [e for e in audit_lines(served.server) if e.get("serial") == openssl_serial(cert)]
    assert (line["decision"], line["subject"]) == ("issued", "CN=cm-post")


def test_enroll_over_get(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    """Without POSTPKIOperation in GetCACaps certmonger sends its pkiMessage by GET."""
    caps = httpx.get(cas["getonly"], params={"operation": "GetCACaps"}, timeout=30).text
    assert "POSTPKIOperation" not in caps
    cert_path, _ = request(certmonger, "getonly", "get", cca.challenge, "cm-get")
    fields = certmonger.wait("get", "MONITORING", "CA_REJECTED", "CA_UNREACHABLE")
    assert fields["status"] == "MONITORING", fields
    issued(cca, cert_path, "cm-get")
    trace = (certmonger.directory / "daemon.log").read_text(errors="replace")
    assert "> GET /scep/getonly?operation=PKIOperation&message=" in trace
    assert "> POST /scep/getonly" not in trace


def test_refusal_ends_as_rejected(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    cert_path, _ = request(certmonger, "hsmscep", "refused", "not-the-challenge", "cm-refused")
    fields = certmonger.wait("refused", "CA_REJECTED", "MONITORING", "CA_UNREACHABLE")
    assert fields["status"] == "CA_REJECTED", fields
    assert "not permitted" in fields.get("ca-error", ""), fields  # failInfo badRequest
    assert not cert_path.exists()
    denied = [e for e in audit_lines(served.server) if e["subject"] == "CN=cm-refused"]
    assert denied and {e["decision"] for e in denied} == {"denied"}


def test_pending_then_approved_arrives_by_its_own_polling(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    cert_path, _ = request(certmonger, "held", "held", cca.challenge, "cm-held")
    fields = certmonger.wait("held", "CA_WORKING", "MONITORING", "CA_REJECTED", "CA_UNREACHABLE")
    assert fields["status"] == "CA_WORKING", fields  # PENDING read as "the CA is working"
    listed = pending_cli(cca, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [r for r in json.loads(listed.stdout) if r["subject"] == "CN=cm-held"]
    approved = pending_cli(cca, "approve", str(row["id"]))
    assert approved.returncode == 0, approved.stderr
    # No restart, no `getcert resubmit`/`refresh`: certmonger's own next poll fetches it.
    fields = certmonger.wait("held", "MONITORING", "CA_REJECTED", timeout=180)
    assert fields["status"] == "MONITORING", fields
    issued(cca, cert_path, "cm-held")
    held = [e for e in audit_lines(served.server) if e["subject"] == "CN=cm-held"]
    assert [e["decision"] for e in held][0] == "pending" and held[-1]["decision"] == "issued"


def test_renewal_keeps_the_key(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    """`getcert resubmit` renews with the key it has, signed by the current certificate."""
    old = x509.load_pem_x509_certificate((certmonger.directory / "post.crt").read_bytes())
    done = certmonger.getcert("resubmit", "-i", "post")
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 120
    path = certmonger.directory / "post.crt"
    while x509.load_pem_x509_certificate(path.read_bytes()) == old:
        assert time.monotonic() < deadline, certmonger.status("post")
        time.sleep(0.5)
    assert certmonger.wait("post", "MONITORING")["status"] == "MONITORING"
    new = issued(cca, path, "cm-post")
    assert new.serial_number != old.serial_number and new.public_key() == old.public_key()
    assert any(
        str(e["outcome"]).startswith(f"renewed {old.serial_number:x}")
        for e in audit_lines(served.server)
    )


def test_renewal_with_the_same_key_refused_where_a_new_key_is_required(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    """A profile with renewal_requires_new_key: `resubmit` is rejected, `rekey` renews."""
    cert_path, _ = request(certmonger, "newkey", "newkey", cca.challenge, "cm-newkey")
    assert certmonger.wait("newkey", "MONITORING", "CA_REJECTED")["status"] == "MONITORING"
    old = issued(cca, cert_path, "cm-newkey")
    done = certmonger.getcert("resubmit", "-i", "newkey")
    assert done.returncode == 0, done.stdout + done.stderr
    # A refused renewal keeps the valid certificate: certmonger goes on MONITORING it and
    # shows the refusal as its ca-error (badRequest), without retrying.
    deadline = time.monotonic() + 120
    while "ca-error" not in (fields := certmonger.status("newkey")):
        assert time.monotonic() < deadline, fields
        time.sleep(0.5)
    assert fields["status"] == "MONITORING" and "not permitted" in fields["ca-error"], fields
    assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == old
    assert any(
        "renewal must use a new key" in str(e["outcome"]) for e in audit_lines(served.server)
    )
    done = certmonger.getcert("rekey", "-i", "newkey")
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 120
    while x509.load_pem_x509_certificate(cert_path.read_bytes()) == old:
        assert time.monotonic() < deadline, certmonger.status("newkey")
        time.sleep(0.5)
    new = issued(cca, cert_path, "cm-newkey")
    assert new.public_key() != old.public_key()


def rollover(ca: DevCa, step: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hsmscep", "rollover", step, "--config", str(ca.config)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr


def test_get_ca_cert_before_during_and_after_rollover(
    cca: DevCa, served: Served, certmonger: Certmonger, cas: dict[str, str]
) -> None:
    url = cas["hsmscep"]
    ca_pem = cca.settings.ca.cert
    old_ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    assert old_ca in helper_certs(url)
    caps = scep_submit("-u", url, "-c")
    assert caps.returncode == 0 and "POSTPKIOperation" in caps.stdout, caps

    rollover(cca, "prepare")  # during: the server still serves the current CA
    served.server.stop()
    served.server = start_server(cca, port=served.port)
    during = helper_certs(url)
    assert old_ca in during and len(during) == 2

    rollover(cca, "activate")
    served.server.stop()
    served.server = start_server(cca, port=served.port)
    new_ca = x509.load_pem_x509_certificate((cca.directory / "ca-g2.pem").read_bytes())
    after = helper_certs(url)
    assert new_ca in after and old_ca not in after and len(after) == 2

    # A CA added now fetches the new GetCACert; certmonger must find CA and RA in it.
    added = certmonger.getcert("add-scep-ca", "-c", "after", "-u", url)
    assert added.returncode == 0, added.stdout + added.stderr
    cert_path, _ = request(certmonger, "after", "after", cca.challenge, "cm-after")
    fields = certmonger.wait("after", "MONITORING", "CA_REJECTED", "CA_UNREACHABLE")
    assert fields["status"] == "MONITORING", fields
    issued(cca, cert_path, "cm-after", ca_pem=cca.directory / "ca-g2.pem")
