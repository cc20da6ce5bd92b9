#!/usr/bin/env bash
# Debian packages the local test tier, the sandbox tests and the SSH baselines need.
set -euo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ps >/dev/null 2>&1 || need+=(procps)
command -v stty >/dev/null 2>&1 || need+=(coreutils)
# The sandbox tests (tests/sandbox): bubblewrap, and libseccomp for the filter.
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || need+=(libseccomp2)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
# The data plane over a FUSE file system (what Lima's /workspace is in the guest):
# tests/test_dataplane_shared_fs.py mounts a bindfs view like agent.sh does.
command -v bindfs >/dev/null 2>&1 || need+=(bindfs)
command -v fusermount >/dev/null 2>&1 || command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# Probes inside the box run the system interpreter (a pyenv/venv under /root is hidden there).
[ -x /usr/bin/python3 ] || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
