#!/usr/bin/env bash
# Regenerate the hashed lock files from pyproject.toml (see requirements/README.md).
# Usage: bash requirements/refresh.sh [extra uv pip compile args, e.g. --upgrade-package X]
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install -q "uv==$UV_VERSION"
compile() {
  "$tools/venv/bin/uv" pip compile pyproject.toml --universal --python-version 3.11 \
    --generate-hashes --no-header --quiet --upgrade "$@"
}
compile -o requirements/runtime.txt "${@}"
compile --extra test -o requirements/test.txt "${@}"
compile --extra test --extra bench -o requirements/bench.txt "${@}"
git --no-pager diff --stat -- requirements/ || true
