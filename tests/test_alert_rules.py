"""The example Prometheus alert rules (docs/prometheus/) load in promtool, and its unit tests
show every alert firing when it should and quiet before; the metric names they use are the
ones docs/operations.md lists."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

RULES = REPO / "docs" / "prometheus" / "hsmscep-alerts.yml"
RULE_TESTS = RULES.with_name("hsmscep-alerts.test.yml")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is absent (Debian package prometheus; tests/run.sh installs it)")
    return found


def run(promtool: str, *args: str) -> str:
    done = subprocess.run(
        [promtool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alert_names() -> set[str]:
    return set(re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.MULTILINE))


def test_the_rules_check(promtool: str) -> None:
    out = run(promtool, "check", "rules", RULES.name)
    assert f"SUCCESS: {len(alert_names())} rules found" in out


def test_every_alert_fires_in_the_unit_tests(promtool: str) -> None:
    run(promtool, "test", "rules", RULE_TESTS.name)
    tests = RULE_TESTS.read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    assert fired == alert_names()
    assert quiet == alert_names()


def test_the_rules_use_only_documented_metrics() -> None:
    used = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in re.findall(r"\bhsmscep_\w+", RULES.read_text())
    }
    operations = (REPO / "docs" / "operations.md").read_text()
    section = re.search(r"^## Metrics\n(.*?)(?=^## )", operations, re.MULTILINE | re.DOTALL)
    if section is None:
        pytest.skip("docs/operations.md has no ## Metrics section yet")
    listed = set(re.findall(r"\bhsmscep_\w+", section.group(1)))
    assert used <= listed, sorted(used - listed)
