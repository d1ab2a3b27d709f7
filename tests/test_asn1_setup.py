"""asn1crypto's classes are all set up at import of hsmscep.protocol.asn1, in one thread: its
lazy, unlocked set-up let two signing threads misparse a valid RA certificate at start
(a CI run of tests/test_rollover.py: "tag should have been 1, but 6 was found")."""

from __future__ import annotations

import subprocess
import sys

from asn1crypto import cms, core

from hsmscep.protocol import asn1


def test_every_asn1crypto_class_is_set_up_at_import() -> None:
    # Classes the suite's own modules define later (test helpers) are theirs to set up.
    ours = [
        cls
        for cls in asn1._subclasses(core.Asn1Value)
        if cls.__module__.startswith("asn1crypto") or cls.__module__ == asn1.__name__
    ]
    assert len(ours) > 300
    left = [cls for cls in ours if cls not in core._SETUP_CLASSES and cls is not core.Choice]
    assert left == []


def test_scep_attribute_names_resolve_both_ways() -> None:
    attribute = cms.CMSAttributeType(asn1.OID_TRANSACTION_ID)
    assert attribute.native == "transaction_id"
    assert cms.CMSAttributeType("transaction_id").dotted == asn1.OID_TRANSACTION_ID


def test_a_fresh_process_has_nothing_left_lazy() -> None:
    code = (
        "import hsmscep.protocol.asn1 as a, asn1crypto.core as c;"
        "print(sum(k not in c._SETUP_CLASSES for k in a._subclasses(c.Asn1Value)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"  # core.Choice alone: abstract, never instantiated
