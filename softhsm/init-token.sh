#!/usr/bin/env bash
# Create a SoftHSM2 token in DIR (default ./softhsm-tokens) without touching /var/lib/softhsm.
# The user PIN is read from $HSMSCEP_PKCS11_PIN or, if unset, generated into DIR/pin (mode 600).
# Usage: softhsm/init-token.sh [DIR] [LABEL]
set -euo pipefail
dir=$(realpath -m "${1:-softhsm-tokens}")
label=${2:-hsmscep}
mkdir -p "$dir/tokens"
sed "s#@TOKENDIR@#$dir/tokens#" "$(dirname "$0")/softhsm2.conf.in" > "$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if softhsm2-util --show-slots | grep -Eq "Label:[[:space:]]+$label[[:space:]]*$"; then
  echo "token '$label' already exists in $dir"
  exit 0
fi
pin=${HSMSCEP_PKCS11_PIN:-}
if [ -z "$pin" ]; then
  umask 077
  pin=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf '%s\n' "$pin" > "$dir/pin"
fi
so_pin=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
# softhsm2-util only takes PINs as arguments; this runs once, locally, for a dev/test token.
softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$pin" >/dev/null
echo "created token '$label'; export SOFTHSM2_CONF=$SOFTHSM2_CONF"
