#!/bin/bash
# cowork base toolchain for the sandbox guest: python3 + venv, Node.js 22 (+ npm),
# gcc/g++/make, Java (default JDK, headless), git, bubblewrap, curl.
#
# Interface (environment, or /etc/cowork/agent.env; all optional):
#   COWORK_TOOLCHAIN=true|false    false skips everything (Lima param CoworkToolchain)
#   COWORK_NODE_MAJOR=22           Node.js major version (NodeSource apt repository)
# Runs as root on Ubuntu 22.04/24.04 and Debian 12. Idempotent and cheap when
# everything is already there (no apt-get at all), so it can run on every boot.
set -euo pipefail
# Defaults from /etc/cowork/agent.env (KEY=VALUE lines; under Lima a `data`
# provision of lima/cowork.yaml writes it); variables already set win.
if [ -r /etc/cowork/agent.env ]; then
  while IFS= read -r line; do
    case "$line" in COWORK_*=*) key=${line%%=*}; [ -n "${!key+set}" ] || export "${line?}" ;; esac
  done </etc/cowork/agent.env
fi

case "${COWORK_TOOLCHAIN:-true}" in 0 | false | no) echo "cowork base.sh: toolchain skipped"; exit 0 ;; esac
NODE_MAJOR=${COWORK_NODE_MAJOR:-22}

log() { echo "cowork base.sh: $*"; }
die() { echo "cowork base.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
command -v apt-get >/dev/null || die "needs a Debian/Ubuntu guest (apt-get)"

export DEBIAN_FRONTEND=noninteractive
# First boot: cloud-init or unattended-upgrades may hold the dpkg lock.
APT=(apt-get -q -y -o DPkg::Lock::Timeout=600)

packages=(ca-certificates curl gnupg git gcc g++ make python3 python3-venv python3-pip
  default-jdk-headless bubblewrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

node_ok() {
  command -v node >/dev/null && [ "$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null)" = "$NODE_MAJOR" ]
}

if [ ${#missing[@]} -eq 0 ] && node_ok; then
  log "toolchain present (node $(node --version))"
  exit 0
fi

updated=0
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  "${APT[@]}" update
  updated=1
  "${APT[@]}" install --no-install-recommends "${missing[@]}"
fi

if ! node_ok; then
  # The distributions ship Node 12 (22.04) or 18 (24.04, Debian 12): use
  # NodeSource's signed repository for the requested major version.
  log "installing Node.js $NODE_MAJOR from deb.nodesource.com"
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key |
    gpg --dearmor --yes -o /etc/apt/keyrings/nodesource.gpg
  chmod 0644 /etc/apt/keyrings/nodesource.gpg
  echo "deb [signed-by=/etc/apt/keyrings/nodesource.gpg] https://deb.nodesource.com/node_${NODE_MAJOR}.x nodistro main" \
    >/etc/apt/sources.list.d/nodesource.list
  # Prefer NodeSource's nodejs over the distribution's.
  printf 'Package: nodejs\nPin: origin deb.nodesource.com\nPin-Priority: 600\n' \
    >/etc/apt/preferences.d/nodesource
  "${APT[@]}" update
  updated=1
  "${APT[@]}" install nodejs
  node_ok || die "node $(node --version 2>/dev/null || echo missing) is not Node.js $NODE_MAJOR"
fi
[ "$updated" = 1 ] && log "toolchain ready: node $(node --version), npm $(npm --version), $(python3 --version), gcc $(gcc -dumpversion), $(java -version 2>&1 | head -n1)"
exit 0
