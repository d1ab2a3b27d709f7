#!/bin/sh
# Serve the mounted configuration ($HSMSCEP_CONFIG, default /data/hsmscep.toml).
# No configuration is an error (exit 2, the CLI's configuration status), never a silent
# fallback: a dev CA with a known challenge on 0.0.0.0 only with HSMSCEP_DEV=1.
set -eu
config=${HSMSCEP_CONFIG:-/data/hsmscep.toml}
if [ -e "$config" ]; then
  if [ ! -f "$config" ] || [ ! -r "$config" ]; then
    echo "hsmscep-entrypoint: $config is not a readable file" >&2
    exit 2
  fi
  exec hsmscep serve --config "$config" --host 0.0.0.0 "$@"
fi
if [ "${HSMSCEP_DEV:-}" = "1" ]; then
  echo "hsmscep-entrypoint: WARNING: no configuration; HSMSCEP_DEV=1 starts a THROW-AWAY" \
    "SoftHSM2 development CA in /data/dev, listening on 0.0.0.0. Never use it in production." >&2
  exec hsmscep dev --dir /data/dev --host 0.0.0.0 "$@"
fi
echo "hsmscep-entrypoint: no configuration at $config: mount one (docs/operations.md)," \
  "set HSMSCEP_CONFIG, or set HSMSCEP_DEV=1 for a throw-away development CA" >&2
exit 2
