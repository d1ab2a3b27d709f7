#!/bin/sh
# With /data/hsmscep.toml (or $HSMSCEP_CONFIG): serve it. Otherwise: a SoftHSM2 dev CA in /data.
set -eu
config=${HSMSCEP_CONFIG:-/data/hsmscep.toml}
if [ -f "$config" ]; then
  exec hsmscep serve --config "$config" --host 0.0.0.0 "$@"
fi
exec hsmscep dev --dir /data/dev --host 0.0.0.0 "$@"
