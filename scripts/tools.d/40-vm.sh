#!/usr/bin/env bash
# What the VM harness (tests/vm, `make e2e`) needs:
#   - Debian packages: QEMU (qemu-system-x86 7.2 has vhost-user-vsock-pci), qemu-img,
#     mmdebstrap + e2fsprogs (the guest image), openssh-client, zstd;
#   - vhost-device-vsock, pinned, built with `cargo install --locked` into
#     .tools/vm/cargo/bin (the host side of the guest's virtio-vsock device).
# Idempotent: does nothing when everything is there. Fails loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/../.."
VHOST_DEVICE_VSOCK_VERSION=${VHOST_DEVICE_VSOCK_VERSION:-0.3.0}
prefix=.tools/vm/cargo
bin=$prefix/bin/vhost-device-vsock

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
# The guest's BIOS / option ROMs for direct kernel boot come with qemu-system-x86
# (seabios, ipxe-qemu) as dependencies.
if [ ${#need[@]} -gt 0 ]; then
  echo "40-vm.sh: installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for t in qemu-system-x86_64 qemu-img mmdebstrap mkfs.ext4 ssh ssh-keygen; do
  command -v "$t" >/dev/null 2>&1 || { echo "40-vm.sh: $t still missing after install" >&2; exit 1; }
done
qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-vsock-pci || {
  echo "40-vm.sh: this QEMU has no vhost-user-vsock-pci device" >&2
  exit 1
}

have_vhost() {
  [ -x "$bin" ] || return 1
  [ "$("$bin" --version 2>/dev/null)" = "vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION" ]
}
if ! have_vhost; then
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "40-vm.sh: cargo (Rust) is required to build vhost-device-vsock (https://rustup.rs)" >&2
    exit 1
  }
  echo "40-vm.sh: cargo install vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION into $prefix (takes ~2 min)"
  mkdir -p "$prefix"
  CARGO_TARGET_DIR="$PWD/.tools/vm/cargo-target" cargo install --quiet --locked \
    --version "$VHOST_DEVICE_VSOCK_VERSION" --root "$PWD/$prefix" vhost-device-vsock >&2
  rm -rf .tools/vm/cargo-target
  have_vhost || { echo "40-vm.sh: $bin --version is not $VHOST_DEVICE_VSOCK_VERSION after install" >&2; exit 1; }
fi
