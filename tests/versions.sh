#!/usr/bin/env bash
# The suite against the lowest versions pyproject.toml allows ("floor") or the newest ones
# available today ("newest"), in a throw-away venv; the lock files are not touched.
# Slow (a fresh venv and the whole pytest suite): not part of .ci/run. Run it before
# refreshing the lock (requirements/README.md) and when changing a floor in pyproject.toml.
# Usage: bash tests/versions.sh floor|newest [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: tests/versions.sh floor|newest [pytest args]}
shift
case "$mode" in
  floor) resolution=(--resolution lowest-direct) ;;
  newest) resolution=(--upgrade) ;;
  *) echo "usage: tests/versions.sh floor|newest [pytest args]" >&2; exit 2 ;;
esac
bash tests/run.sh --collect-only -q >/dev/null  # system packages and the locked venv's tools
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q "uv==0.13.9"
"$work/tools/bin/uv" pip compile pyproject.toml --extra test --python-version 3.11 \
  "${resolution[@]}" --no-header --quiet -o "$work/requirements.txt"
echo "== $mode versions:"
grep -E '^(cryptography|asn1crypto|python-pkcs11|starlette|uvicorn|aiosqlite|httpx|pytest)==' \
  "$work/requirements.txt"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q -r "$work/requirements.txt"
"$work/venv/bin/python" -m pip install -q --no-deps -e . 2>/dev/null
# Lint and types are checked with the locked tools in tests/run.sh; here only behaviour.
PATH="$work/venv/bin:$PATH" "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
