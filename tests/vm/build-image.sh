#!/usr/bin/env bash
# Builds the Debian 12 guest for the VM harness: OUT/vmlinuz, OUT/initrd.img and
# OUT/rootfs.img (raw ext4, root=/dev/vda), logging in as root with OUT/id_ed25519.
#
#   tests/vm/build-image.sh OUT
#
# Only what any Lima-style Debian/Ubuntu cloud image already has goes in here
# (systemd, python3 + venv, sshd, the kernel with its vsock modules). The agent
# itself is NOT installed here: the harness installs it after boot with the
# project's own provisioning script (lima/provision/), as Lima would.
# The caller caches OUT keyed by this file's hash (tests/vm/image.py).
set -euo pipefail
out=${1:?usage: build-image.sh OUT}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd-sysv,udev,kmod,dbus,python3,python3-venv,python3-pip,openssh-server,iproute2,ca-certificates,procps,bubblewrap,libseccomp2,linux-image-amd64,initramfs-tools,zstd,sudo,less
SIZE=${SIZE:-3G}

for t in mmdebstrap mkfs.ext4 ssh-keygen; do
  command -v "$t" >/dev/null || { echo "build-image.sh: $t missing (make setup installs it)" >&2; exit 1; }
done
mkdir -p "$out"
work=$(mktemp -d "${out%/}.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

ssh-keygen -q -t ed25519 -N '' -C cowork-vm-harness -f "$work/id_ed25519"

# A small initramfs with just what a virtio guest needs to mount its root,
# configured before the kernel's postinst generates it (once).
hook_initramfs='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf "MODULES=list\nCOMPRESS=zstd\n" >"$1/etc/initramfs-tools/conf.d/cowork.conf"
printf "virtio_pci\nvirtio_blk\nvirtio_net\next4\ncrc32c_generic\n" >"$1/usr/share/initramfs-tools/modules.d/cowork"'

mmdebstrap --variant=apt --mode=root --format=directory \
  --include="$PACKAGES" \
  --essential-hook="$hook_initramfs" \
  "$SUITE" "$root" "$MIRROR"

# --- guest configuration -----------------------------------------------------
echo cowork-vm >"$root/etc/hostname"
printf '127.0.1.1\tcowork-vm\n' >>"$root/etc/hosts"
printf '/dev/vda\t/\text4\terrors=remount-ro,noatime\t0\t1\n' >"$root/etc/fstab"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
mkdir -p "$root/etc/ssh/sshd_config.d"
cat >"$root/etc/ssh/sshd_config.d/cowork.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
EOF
# DHCP on the user-mode network (QEMU's slirp) via systemd-networkd.
cat >"$root/etc/systemd/network/10-dhcp.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
EOF
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
# vsock transport for virtio (udev would load it too; be explicit).
printf 'vmw_vsock_virtio_transport\n' >"$root/etc/modules-load.d/vsock.conf"
# Speed up boot under TCG: nothing waits for "online", no periodic jobs.
for u in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer dpkg-db-backup.timer \
  systemd-tmpfiles-clean.timer logrotate.timer; do
  chroot "$root" systemctl mask "$u" >/dev/null 2>&1 || true
done
# Serial console login prompt is not needed; keep the console for kernel/systemd output.
chroot "$root" systemctl mask serial-getty@ttyS0.service >/dev/null 2>&1 || true
rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"
chroot "$root" apt-get clean

# --- kernel, initrd and the root filesystem image ------------------------------
kver=$(basename "$(ls -d "$root"/lib/modules/* | head -1)")
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
rm -f "$work/rootfs.img"
mkfs.ext4 -q -F -L root -d "$root" "$work/rootfs.img" "$SIZE"
echo "$kver" >"$work/kernel-version"
for f in vmlinuz initrd.img rootfs.img id_ed25519 id_ed25519.pub kernel-version; do
  mv "$work/$f" "$out/$f"
done
echo "built guest image in $out (kernel $kver)"
