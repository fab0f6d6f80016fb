#!/usr/bin/env bash
# Debian packages the tests and benches use, installed only where missing (apt-get update runs once, and
# only if something is missing).
#   nginx: the load balancer in front of the serving replicas   redis-server: the shared embedding cache
#   wordnet-base: the search corpus                              dataset-fashion-mnist: real images offline
#   iproute2: network namespaces for the multi-node training test
# Exit status: 0 all present (or just installed), 3 missing and not installable here (not root, or no
# apt-get): then it prints the one command to run, and the tests that need a package skip naming it.
#   --check   only tell (exit 0 / 1), print nothing
set -euo pipefail
PKGS=(nginx redis-server wordnet-base dataset-fashion-mnist iproute2)
HINT="sudo make system-deps"  # the one command; tests' skip reasons name it too (common/env.py)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${1:-}" = "--check" ]; then [ ${#missing[@]} -eq 0 ]; exit; fi
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "set-up: Debian packages missing (${missing[*]}); run: $HINT   (tests that need them skip until then)" >&2
  exit 3
fi
echo "set-up: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian nginx and redis packages start system services; the project runs its own on loopback ports.
for svc in nginx redis-server; do
  command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1 || true
done
