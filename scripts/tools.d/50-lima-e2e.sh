#!/usr/bin/env bash
# What the Lima tier (tests/lima_e2e, make lima-e2e) needs beyond limactl (30-limactl.sh)
# and QEMU + mmdebstrap (40-vm.sh):
#   - python3-venv: coworkctl runs there as an unprivileged host user (limactl refuses
#     root), from a venv of the system python3 that the harness builds and caches in
#     .tools/lima-e2e/ (the project's .venv may live where that user cannot reach);
#   - setpriv (util-linux), to run as that user; ssh, to find and kill Lima's SSH master.
# The host user itself (cowork-e2e) is created by the harness, idempotently.
# Idempotent: does nothing when everything is there.
set -euo pipefail
need=()
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v useradd >/dev/null 2>&1 || need+=(passwd)
if [ ${#need[@]} -gt 0 ]; then
  echo "50-lima-e2e.sh: installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
/usr/bin/python3 -c 'import ensurepip, venv' || { echo "50-lima-e2e.sh: python3 -m venv still unusable" >&2; exit 1; }
