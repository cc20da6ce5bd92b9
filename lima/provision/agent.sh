#!/bin/bash
# Installs the cowork guest agent: a venv under /opt/cowork from the project's
# wheel, the token (root, 0600), and the systemd unit cowork-agent.service
# (listening on unix:/run/cowork/agent.sock and vsock:7070, restart on failure).
# Runs as root on Ubuntu 22.04/24.04 and Debian 12; idempotent (Lima runs it on
# every boot: an unchanged wheel and unit cost no pip and no restart).
#
# Interface: environment variables, all optional; /etc/cowork/agent.env (KEY=VALUE
# lines) supplies defaults for unset ones (under Lima a `data` provision of
# lima/cowork.yaml writes that file, with the Lima user and the params).
#   COWORK_WHEEL=PATH          the project wheel (.whl), or a directory holding one
#                              (newest wins). Default: /opt/cowork/dist (under Lima
#                              a read-only mount of the instance's cowork-dist dir,
#                              where coworkctl init puts the wheel).
#   COWORK_WHEEL_WAIT=120      seconds to wait for a wheel to appear in that
#                              directory (a reverse-sshfs mount arrives late).
#   COWORK_WHEELHOUSE=DIR      install dependencies offline, only from DIR
#                              (pip --no-index --find-links DIR). Default: PyPI.
#   COWORK_TOKEN_SRC=PATH      file holding the token; installed as /etc/cowork/token
#                              (root:root 0600). Default: keep /etc/cowork/token
#                              (Lima: written there 0600 by a `data` provision).
#   COWORK_GENERATE_TOKEN=1    no token anywhere: generate one in the guest
#                              (32 random bytes, hex). Never printed.
#   COWORK_SOCKET_USER=USER    user that must reach the unix socket (under Lima:
#                              the Lima user, as whom the SSH socket forward connects).
#                              The socket becomes 0660, group = USER's primary
#                              group (present since the user was created, so an
#                              SSH session opened before this script already has
#                              it). Empty: socket 0600, root only.
#   COWORK_SOCKET_GROUP=GROUP  use this group instead of USER's primary group.
#   COWORK_SANDBOX_USER=NAME   the dedicated unprivileged user every process and
#                              Claude run executes as (created here: no password,
#                              no sudo, home 0700). Default: a random cowork-XXXXXX,
#                              chosen once and kept in /etc/cowork/sandbox-user.
#   COWORK_RUN_AS=USER         override the user processes run as ("root" = the
#                              agent's --allow-root; never the Lima user by default).
#   COWORK_SANDBOX=bwrap|none  sandbox written into a new /etc/cowork/policy.yaml
#                              (default bwrap; an existing policy file is kept).
#   COWORK_VSOCK=auto|1|0      listen on vsock:$COWORK_VSOCK_PORT. auto (default):
#                              only when the guest has a virtio-vsock device (Lima
#                              on vz has one, Lima on qemu does not).
#   COWORK_VSOCK_PORT=7070
#   COWORK_ROOT=/workspace     workspace root given to the agent (created if missing).
#   COWORK_WORKSPACE_SOURCE=DIR  a host share (Lima's mount of the user's workspace,
#                              owned by the Lima user's uid, which other guest users
#                              cannot write) to present at $COWORK_ROOT through bindfs
#                              (FUSE, unit cowork-workspace.service, started before the
#                              agent): the sandbox user and COWORK_SOCKET_USER each see
#                              themselves as the owner of every file, new files are
#                              created as the share's owner (so they land on the host as
#                              the host user), chown is a no-op; both mounts are nosuid.
#                              bindfs is installed with apt when missing.
#                              Why bindfs: lima/README.md ("The workspace"). Unset: none.
#   COWORK_INSTALL_TOOLCHAIN=0 1: run base.sh (next to this script) first.
#   COWORK_INSTALL_CLAUDE=0    1: run claude.sh (next to this script) first.
#   COWORK_START=auto|1|0      enable + (re)start the unit and wait for its socket.
#                              auto: when systemd is running (not in a chroot).
#   COWORK_PYTHON=python3      interpreter for the venv (>= 3.10).
#   COWORK_AGENT_ARGS="..."    extra cowork-agent arguments (e.g. "--log-level debug").
#   COWORK_PREFIX=/opt/cowork
# Result: $COWORK_PREFIX/venv/bin/cowork-agent, /etc/cowork/token,
#   /etc/systemd/system/cowork-agent.service, and $COWORK_PREFIX/bin/cowork-health
#   (exit 0 when the agent answers grpc.health.v1 as SERVING on its socket; Lima's
#   readiness probe runs it as the Lima user). Exit 0 = installed (and, when
#   started, the socket exists); 1 = failed, one line on stderr. The token is
#   never printed.
set -euo pipefail
if [ -r /etc/cowork/agent.env ]; then
  while IFS= read -r line; do
    case "$line" in COWORK_*=*) key=${line%%=*}; [ -n "${!key+set}" ] || export "${line?}" ;; esac
  done </etc/cowork/agent.env
fi

PREFIX=${COWORK_PREFIX:-/opt/cowork}
VENV=$PREFIX/venv
TOKEN=/etc/cowork/token
SOCKET=/run/cowork/agent.sock
UNIT=/etc/systemd/system/cowork-agent.service
ROOT=${COWORK_ROOT:-/workspace}
VSOCK=${COWORK_VSOCK:-auto}
VSOCK_PORT=${COWORK_VSOCK_PORT:-7070}
PYTHON=${COWORK_PYTHON:-python3}
SOCKET_USER=${COWORK_SOCKET_USER:-}
here=$(cd "$(dirname "$0")" && pwd)

log() { echo "cowork agent.sh: $*"; }
die() { echo "cowork agent.sh: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

case "${COWORK_INSTALL_TOOLCHAIN:-0}" in 1 | true | yes) COWORK_INSTALL_TOOLCHAIN=1 bash "$here/base.sh" ;; esac
case "${COWORK_INSTALL_CLAUDE:-0}" in 1 | true | yes) COWORK_INSTALL_CLAUDE=1 bash "$here/claude.sh" ;; esac

# --- the wheel --------------------------------------------------------------
wheel=${COWORK_WHEEL:-$PREFIX/dist}
if [ -d "$wheel" ]; then
  found=""
  for _ in $(seq 1 "${COWORK_WHEEL_WAIT:-120}"); do
    # shellcheck disable=SC2012 # wheel names are plain
    found=$(ls -t "$wheel"/*.whl 2>/dev/null | head -n1 || true)
    [ -n "$found" ] && break
    sleep 1
  done
  [ -n "$found" ] || die "no agent wheel in $wheel: create the VM with 'coworkctl init' (it delivers the wheel), or set COWORK_WHEEL"
  wheel=$found
fi
[ -f "$wheel" ] || die "agent wheel not found: $wheel"

# --- the venv ----------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "$PYTHON is $("$PYTHON" --version 2>&1); the agent needs Python >= 3.10"
install -d -m 0755 "$PREFIX"
want=$(sha256sum "$wheel" | cut -d' ' -f1)
have=$(cat "$PREFIX/.wheel-sha256" 2>/dev/null || true)
changed=0
if [ "$want" != "$have" ] || ! "$VENV/bin/cowork-agent" --version >/dev/null 2>&1; then
  log "installing $(basename "$wheel") into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON (install python3-venv)"
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  # pip trusts its own CA list (certifi), not the system's: use the system bundle,
  # which also holds CAs added with Lima's caCerts (coworkctl init --ca-cert), e.g.
  # for a TLS-inspecting proxy between the guest and PyPI.
  if [ -z "${PIP_CERT:-}" ] && [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
  fi
  if [ -n "${COWORK_WHEELHOUSE:-}" ]; then
    pip+=(--no-index --find-links "$COWORK_WHEELHOUSE")
  fi
  "${pip[@]}" "$wheel" || die "pip could not install $wheel"
  # Same version, new build: replace the project itself, keep the dependencies.
  "${pip[@]}" --force-reinstall --no-deps "$wheel" || die "pip could not reinstall $wheel"
  "$VENV/bin/cowork-agent" --version >/dev/null || die "$VENV/bin/cowork-agent does not run"
  echo "$want" >"$PREFIX/.wheel-sha256"
  changed=1
fi

# The health check (Lima's readiness probe; usable by any harness).
install -d -m 0755 "$PREFIX/bin"
cat >"$PREFIX/bin/cowork-health.tmp" <<HEALTH
#!/bin/sh
# Exit 0 when the cowork agent answers grpc.health.v1 as SERVING on its socket.
# Usage: cowork-health [SOCKET] [TIMEOUT_SECONDS]   (written by agent.sh)
exec "$VENV/bin/python" - "\${1:-$SOCKET}" "\${2:-3}" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sock, timeout = sys.argv[1], float(sys.argv[2])
with grpc.insecure_channel(f"unix:{sock}") as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    except grpc.RpcError as exc:
        sys.exit(f"cowork-health: {sock}: {exc.code().name}: {exc.details()}")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(f"cowork-health: {sock}: not serving ({reply.status})")
print(f"cowork-health: {sock}: serving")
PY
HEALTH
chmod 0755 "$PREFIX/bin/cowork-health.tmp"
mv -f "$PREFIX/bin/cowork-health.tmp" "$PREFIX/bin/cowork-health"

# --- the token ---------------------------------------------------------------
install -d -m 0755 /etc/cowork
if [ -n "${COWORK_TOKEN_SRC:-}" ] && [ "$COWORK_TOKEN_SRC" != "$TOKEN" ]; then
  [ -s "$COWORK_TOKEN_SRC" ] || die "token source is missing or empty: $COWORK_TOKEN_SRC"
  if ! cmp -s "$COWORK_TOKEN_SRC" "$TOKEN"; then
    install -m 0600 -o root -g root "$COWORK_TOKEN_SRC" "$TOKEN"
    changed=1
  fi
elif [ ! -s "$TOKEN" ]; then
  case "${COWORK_GENERATE_TOKEN:-0}" in
  1 | true | yes)
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN")
    log "generated a token in $TOKEN"
    changed=1
    ;;
  *) die "no token at $TOKEN: create the VM with 'coworkctl init', or set COWORK_TOKEN_SRC" ;;
  esac
fi
chown root:root "$TOKEN"
chmod 0600 "$TOKEN"
# The agent reads the token once, when it starts. A token that differs from the one
# it was last (re)started with means a restart, or the old token keeps working: a
# clone's first boot (coworkctl clone), where Lima's data provision wrote the clone's
# own token over the copy of the base's, while systemd may already have started the
# agent from the copied disk.
TOKEN_APPLIED=/etc/cowork/token.applied
token_sum=$(sha256sum "$TOKEN" | cut -d' ' -f1)
[ "$(cat "$TOKEN_APPLIED" 2>/dev/null || true)" = "$token_sum" ] || changed=1

# --- the unit ----------------------------------------------------------------
args=(--listen "unix:$SOCKET")
case "$VSOCK" in
1 | true | yes) args+=(--listen "vsock:$VSOCK_PORT") ;;
auto)
  # virtio device id 19 (0x0013) = virtio-vsock (vz, vhost-vsock, vhost-user-vsock)
  if grep -qsx 0x0013 /sys/bus/virtio/devices/*/device; then
    args+=(--listen "vsock:$VSOCK_PORT")
  fi
  ;;
esac
args+=(--token-file "$TOKEN" --root "$ROOT" --log-format json)
group=${COWORK_SOCKET_GROUP:-}
if [ -z "$group" ] && [ -n "$SOCKET_USER" ]; then
  group=$(id -gn "$SOCKET_USER") || die "socket user $SOCKET_USER does not exist"
fi
[ -n "$group" ] && args+=(--socket-group "$group")
# --- the sandbox user and the policy ------------------------------------------
sandbox_user=${COWORK_SANDBOX_USER:-$(cat /etc/cowork/sandbox-user 2>/dev/null || true)}
if [ -z "$sandbox_user" ]; then
  sandbox_user="cowork-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
fi
case "$sandbox_user" in *[!a-z0-9_-]* | "" | root) die "bad sandbox user name: $sandbox_user" ;; esac
if ! id -u "$sandbox_user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --user-group "$sandbox_user" ||
    die "cannot create the sandbox user $sandbox_user"
  passwd --lock "$sandbox_user" >/dev/null
  log "created the sandbox user $sandbox_user"
fi
chmod 0700 "$(getent passwd "$sandbox_user" | cut -d: -f6)"
printf '%s\n' "$sandbox_user" >/etc/cowork/sandbox-user
run_as=${COWORK_RUN_AS:-$sandbox_user}
if [ "$run_as" = root ]; then
  args+=(--allow-root)
else
  id -u "$run_as" >/dev/null 2>&1 || die "run-as user $run_as does not exist"
  args+=(--run-as "$run_as")
fi
POLICY=/etc/cowork/policy.yaml
if [ ! -s "$POLICY" ]; then
  sandbox=${COWORK_SANDBOX:-bwrap}
  case "$sandbox" in bwrap | none) ;; *) die "COWORK_SANDBOX must be bwrap or none, not $sandbox" ;; esac
  [ "$sandbox" = none ] || command -v bwrap >/dev/null || die "the bwrap sandbox needs bubblewrap (apt-get install bubblewrap)"
  # Per-run limits: 3/4 of the guest's memory, 4096 tasks, every CPU (the agent keeps the rest).
  mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  (umask 077 && printf '%s\n' "# cowork sandbox policy (coworkctl policy show|set|allow|deny|preset)" \
    "sandbox: $sandbox" "network:" "  preset: default" "limits:" \
    "  memory: $((mem_kib * 3 / 4 / 1024))MiB" "  pids: 4096" "  cpus: $(nproc)" \
    "  max: {memory: $((mem_kib * 7 / 8 / 1024))MiB, pids: 16384, cpus: $(nproc)}" >"$POLICY")
  log "wrote $POLICY (sandbox: $sandbox)"
fi
install -d -m 0700 /var/log/cowork
args+=(--policy "$POLICY" --egress-log /var/log/cowork/egress.jsonl)
# shellcheck disable=SC2206 # word splitting is the interface of COWORK_AGENT_ARGS
[ -n "${COWORK_AGENT_ARGS:-}" ] && args+=(${COWORK_AGENT_ARGS})
install -d -m 0755 "$ROOT"

# --- the workspace: a host share, writable for the sandbox user ----------------
# (see COWORK_WORKSPACE_SOURCE above; why bindfs: lima/README.md, "The workspace")
WS_UNIT=/etc/systemd/system/cowork-workspace.service
agent_deps=""
if [ -n "${COWORK_WORKSPACE_SOURCE:-}" ]; then
  src=$COWORK_WORKSPACE_SOURCE
  case "$src" in /*) ;; *) die "COWORK_WORKSPACE_SOURCE must be an absolute path, not $src" ;; esac
  [ "$src" != "$ROOT" ] || die "COWORK_WORKSPACE_SOURCE must differ from the workspace root $ROOT"
  for _ in $(seq 1 "${COWORK_WHEEL_WAIT:-120}"); do # a reverse-sshfs mount arrives late
    mountpoint -q "$src" && break
    sleep 1
  done
  mountpoint -q "$src" || die "the workspace share $src is not mounted (see the mounts in lima.yaml)"
  # What the box writes lands on the host, set-id bits included (bindfs cannot filter
  # them out): make them inert in the guest, on this view as on the bindfs one.
  case ",$(findmnt -n -o OPTIONS --mountpoint "$src")," in *,nosuid,*) ;; *)
    mount -o remount,nosuid,nodev "$src" || die "cannot remount $src nosuid,nodev"
    ;;
  esac
  if ! command -v bindfs >/dev/null; then
    log "installing bindfs (makes $src writable for $run_as at $ROOT)"
    export DEBIAN_FRONTEND=noninteractive
    apt=(apt-get -q -y -o DPkg::Lock::Timeout=600)
    "${apt[@]}" install --no-install-recommends bindfs >/dev/null 2>&1 ||
      { "${apt[@]}" update >/dev/null && "${apt[@]}" install --no-install-recommends bindfs >/dev/null; } ||
      die "cannot install bindfs with apt-get (the workspace needs it): check the guest's network and apt sources"
  fi
  mirror=$run_as
  [ -n "$SOCKET_USER" ] && [ "$SOCKET_USER" != "$run_as" ] && mirror+=",$SOCKET_USER"
  [ "$run_as" = root ] && mirror=${SOCKET_USER:-root}
  fuse_opts=allow_other,nosuid,nodev
  # libfuse 2 (Debian 12's and Ubuntu 22.04's bindfs) writes in 4 KiB requests unless
  # told otherwise: 3 MB/s instead of 70 here under TCG. libfuse 3 always does, and
  # refuses the option.
  if ldd "$(command -v bindfs)" 2>/dev/null | grep -q 'libfuse\.so\.2'; then
    fuse_opts+=,big_writes
  fi
  bindfs_cmd="$(command -v bindfs) -o $fuse_opts --mirror=$mirror"
  bindfs_cmd+=" --create-for-user=$(stat -c %u "$src") --create-for-group=$(stat -c %g "$src")"
  bindfs_cmd+=" --chown-ignore --chgrp-ignore $src $ROOT"
  fusermount=$(command -v fusermount3 || command -v fusermount) || die "bindfs is installed but fusermount is not"
  ws_text="[Unit]
Description=cowork workspace: $src at $ROOT, writable for $mirror (bindfs)
RequiresMountsFor=$src
Before=cowork-agent.service

[Service]
Type=forking
ExecStartPre=-$fusermount -u -z $ROOT
ExecStart=$bindfs_cmd
ExecStop=$fusermount -u -z $ROOT
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"
  ws_changed=0
  if [ "$(cat "$WS_UNIT" 2>/dev/null || true)" != "$(printf "%s" "$ws_text")" ]; then
    printf '%s' "$ws_text" >"$WS_UNIT.tmp"
    chmod 0644 "$WS_UNIT.tmp"
    mv -f "$WS_UNIT.tmp" "$WS_UNIT"
    ws_changed=1
    log "wrote $WS_UNIT ($src at $ROOT for $mirror)"
  fi
  agent_deps="Requires=cowork-workspace.service
After=cowork-workspace.service
"
fi

claude_env=""
if [ -x "$PREFIX/claude/node_modules/.bin/claude" ]; then
  claude_env="Environment=COWORK_CLAUDE_BIN=$PREFIX/claude/node_modules/.bin/claude
"
fi
exec_start="$VENV/bin/cowork-agent"
for a in "${args[@]}"; do
  case "$a" in *[[:space:]\"\\\$%]*) die "unsupported character in agent argument: $a" ;; esac
  exec_start+=" $a"
done
unit_text="[Unit]
Description=cowork guest agent (gRPC: processes, files, Claude Code)
After=network.target local-fs.target
RequiresMountsFor=$ROOT
${agent_deps}StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart=$exec_start
Restart=on-failure
RestartSec=2
# The agent puts every run in its own cgroup below its own (guest_agent/cgroups.py),
# and must outlive a workload that exhausts memory.
Delegate=yes
OOMScoreAdjust=-900
# Deliberate, not systemd's 1024: a running exec holds ~6 fds and an egress
# connection 2, so 1024 caps concurrency near 150. Leaks are a different matter:
# the soak tier (tests/soak) proves every call gives its fds back at 1024.
LimitNOFILE=16384
RuntimeDirectory=cowork
RuntimeDirectoryMode=0755
Environment=HOME=/root
Environment=DISABLE_AUTOUPDATER=1
${claude_env}
[Install]
WantedBy=multi-user.target
"
# $(...) drops trailing newlines on both sides: compare like with like.
if [ "$(cat "$UNIT" 2>/dev/null || true)" != "$(printf "%s" "$unit_text")" ]; then
  printf '%s' "$unit_text" >"$UNIT.tmp"
  chmod 0644 "$UNIT.tmp"
  mv -f "$UNIT.tmp" "$UNIT"
  changed=1
  log "wrote $UNIT"
fi

# --- start ---------------------------------------------------------------------
start=${COWORK_START:-auto}
if [ "$start" = auto ]; then
  if [ -d /run/systemd/system ]; then start=1; else start=0; fi
fi
case "$start" in 1 | true | yes) ;; *)
  mkdir -p /etc/systemd/system/multi-user.target.wants
  ln -sfn "$UNIT" /etc/systemd/system/multi-user.target.wants/cowork-agent.service
  [ -n "$agent_deps" ] && ln -sfn "$WS_UNIT" /etc/systemd/system/multi-user.target.wants/cowork-workspace.service
  log "installed (not started: no running systemd)"
  (umask 077 && printf '%s\n' "$token_sum" >"$TOKEN_APPLIED") # read at the agent's first start
  exit 0
  ;;
esac
systemctl daemon-reload
if [ -n "$agent_deps" ]; then
  systemctl enable --quiet cowork-workspace.service
  if [ "$ws_changed" = 1 ]; then
    systemctl restart cowork-workspace.service || true
  else
    systemctl start cowork-workspace.service || true
  fi
  if [ "$(findmnt -n -o FSTYPE --mountpoint "$ROOT" 2>/dev/null)" != fuse ]; then
    why=$(journalctl --no-pager -o cat _SYSTEMD_UNIT=cowork-workspace.service -n 3 2>/dev/null | grep . | tail -n1 || true)
    die "cowork-workspace.service did not mount $src at $ROOT (${why:-no output}): journalctl -u cowork-workspace.service"
  fi
  # The point of it all: the identity processes run as can create files there.
  # shellcheck disable=SC2016 # expanded by the inner sh
  if [ "$run_as" != root ] &&
    ! setpriv --reuid="$run_as" --regid="$(id -g "$run_as")" --init-groups \
      sh -c 'f=$(mktemp -p "$1" .cowork-write-check.XXXXXX) && rm -f "$f"' sh "$ROOT"; then
    die "$run_as cannot create files in $ROOT (bindfs over $src): journalctl -u cowork-workspace.service"
  fi
fi
systemctl enable --quiet cowork-agent.service
restarts() { systemctl show -p NRestarts --value cowork-agent.service 2>/dev/null || echo 0; }
before=$(restarts)
if [ "$changed" = 1 ]; then
  systemctl restart cowork-agent.service
else
  systemctl start cowork-agent.service
fi
for _ in $(seq 1 300); do
  [ -S "$SOCKET" ] && systemctl is-active --quiet cowork-agent.service && break
  # A crash loop does not end by waiting longer: say why after the third failed start.
  [ $(($(restarts) - before)) -ge 3 ] && break
  sleep 0.2
done
if ! [ -S "$SOCKET" ]; then
  why=$(journalctl --no-pager -o cat _SYSTEMD_UNIT=cowork-agent.service -n 5 2>/dev/null | grep . | tail -n1 || true)
  die "cowork-agent.service does not start (${why:-no output}): check COWORK_AGENT_ARGS (Lima param CoworkAgentArgs), then journalctl -u cowork-agent.service"
fi
(umask 077 && printf '%s\n' "$token_sum" >"$TOKEN_APPLIED")
log "cowork-agent $("$VENV/bin/cowork-agent" --version | awk '{print $2}') running: ${args[*]}"
