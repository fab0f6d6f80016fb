#!/usr/bin/env bash
# Debian packages the tests and benches use, installed only where missing (apt-get update runs once, and
# only if something is missing). Without root it says what is missing and carries on: the tests that need
# a package skip with a stated reason.
#   nginx: the load balancer in front of the serving replicas   redis-server: the shared embedding cache
#   wordnet-base: the search corpus                              dataset-fashion-mnist: real images offline
#   iproute2: network namespaces for the multi-node training test
set -euo pipefail
PKGS=(nginx redis-server wordnet-base dataset-fashion-mnist iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then echo "system deps: all present"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system deps: missing ${missing[*]} (need root + apt-get); tests that need them will skip" >&2
  exit 0
fi
echo "system deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian nginx and redis packages start system services; the project runs its own on loopback ports.
for svc in nginx redis-server; do
  command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1 || true
done
