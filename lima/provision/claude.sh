#!/bin/bash
# Claude Code CLI for the sandbox guest, pinned, from npm.
#
# Interface (environment, or /etc/cowork/agent.env; all optional):
#   COWORK_CLAUDE=true|false       false skips it (Lima param CoworkClaude)
#   COWORK_CLAUDE_VERSION=X.Y.Z    default 2.1.330 (Lima param CoworkClaudeVersion)
#   COWORK_PREFIX=/opt/cowork
# Installs into $COWORK_PREFIX/claude with `npm install --prefix` (a local
# prefix, NOT `npm -g`): root-owned and read-only to the user Claude runs as,
# so neither Claude nor the code it writes can replace or auto-update the
# pinned binary. /usr/local/bin/claude links to it; the agent also looks there.
# The npm package is a launcher plus a native binary in a platform package
# pulled in as an optional dependency: optional dependencies must be included.
# Idempotent: does nothing when the pinned version is already installed.
set -euo pipefail
# Defaults from /etc/cowork/agent.env (KEY=VALUE lines; under Lima a `data`
# provision of lima/cowork.yaml writes it); variables already set win.
if [ -r /etc/cowork/agent.env ]; then
  while IFS= read -r line; do
    case "$line" in COWORK_*=*) key=${line%%=*}; [ -n "${!key+set}" ] || export "${line?}" ;; esac
  done </etc/cowork/agent.env
fi

case "${COWORK_CLAUDE:-true}" in 0 | false | no) echo "cowork claude.sh: Claude Code skipped"; exit 0 ;; esac
VERSION=${COWORK_CLAUDE_VERSION:-2.1.330}
PREFIX=${COWORK_PREFIX:-/opt/cowork}
dir=$PREFIX/claude
bin=$dir/node_modules/.bin/claude

log() { echo "cowork claude.sh: $*"; }
die() { echo "cowork claude.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

installed_version() {
  [ -x "$bin" ] || return 1
  DISABLE_AUTOUPDATER=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 60 "$bin" --version 2>/dev/null |
    awk '{print $1; exit}'
}

if [ "$(installed_version || true)" != "$VERSION" ]; then
  command -v npm >/dev/null || die "npm is missing (run base.sh first, or COWORK_INSTALL_TOOLCHAIN=1)"
  log "installing @anthropic-ai/claude-code@$VERSION into $dir"
  # Node trusts its built-in CA list; add the system's, which also holds CAs added
  # with Lima's caCerts (coworkctl init --ca-cert), e.g. for a TLS-inspecting proxy.
  if [ -z "${NODE_EXTRA_CA_CERTS:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
  fi
  install -d -m 0755 "$dir"
  npm install --prefix "$dir" --no-audit --no-fund --include=optional --save-exact \
    "@anthropic-ai/claude-code@$VERSION"
  chmod -R go-w "$dir"
  got=$(installed_version || true)
  [ "$got" = "$VERSION" ] || die "$bin reports '${got:-nothing}', expected $VERSION"
fi
ln -sfn "$bin" /usr/local/bin/claude
log "claude $VERSION at $bin"
