#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 box (root): system packages, a venv, lint, types, tests.
# Usage: bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(softhsm2 scep opensc openssl certmonger faketime python3-venv postgresql p11-kit
  p11-kit-modules libp11-kit-dev gcc prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Exactly the locked, hash-checked versions (requirements/README.md), then the package alone.
.venv/bin/python -m pip install -q --require-hashes -r requirements/test.txt
.venv/bin/python -m pip install -q --no-deps -e .

.venv/bin/ruff check hsmscep tests bench
.venv/bin/ruff format --check hsmscep tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
