#!/usr/bin/env bash
# Builds the Debian 12 guest for the VM harness: OUT/vmlinuz, OUT/initrd.img and
# OUT/rootfs.img (raw ext4, root=/dev/vda), logging in as root with OUT/id_ed25519.
#
#   tests/vm/build-image.sh OUT            the VM tier's guest (tests/vm, make e2e)
#   tests/vm/build-image.sh --lima OUT     a Lima cloud image (tests/lima_e2e, make lima-e2e)
#
# Only what any Lima-style Debian/Ubuntu cloud image already has goes in here
# (systemd, python3 + venv, sshd, the kernel with its vsock modules). The agent
# itself is NOT installed here: the harness installs it after boot with the
# project's own provisioning script (lima/provision/), as Lima would.
# The caller caches OUT keyed by this file's hash (tests/vm/harness.py).
#
# --lima: the same guest as a cloud image Lima boots directly (images[].kernel/initrd,
# firmware.legacyBIOS): OUT/vmlinuz, OUT/initrd.img, OUT/disk.qcow2 and OUT/cmdline.
# Lima creates its user and keys with cloud-init from its cidata CD (virtio-scsi),
# so cloud-init goes in, and the CD's modules go into the initramfs (without them
# cloud-init finds no datasource, and Lima waits for SSH until it gives up). No root
# key. Also what Lima's boot scripts would otherwise apt-get (rsync, iptables), fuse3
# (Ubuntu's cloud images have it; installed later, its initramfs hook costs minutes
# under TCG; agent.sh still apt-gets bindfs itself), and what cowork's provisioning
# needs when its toolchain step is off because deb.nodesource.com is out of reach
# here: Debian's nodejs + npm (18; Claude Code's launcher runs on it), git, curl.
set -euo pipefail
variant=vm
if [ "${1:-}" = --lima ]; then
  variant=lima
  shift
fi
out=${1:?usage: build-image.sh [--lima] OUT}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd-sysv,udev,kmod,dbus,python3,python3-venv,python3-pip,openssh-server,iproute2,ca-certificates,procps,bubblewrap,libseccomp2,linux-image-amd64,initramfs-tools,zstd,sudo,less
MODULES="virtio_pci virtio_blk virtio_net ext4 crc32c_generic"
if [ "$variant" = lima ]; then
  PACKAGES=$PACKAGES,cloud-init,systemd-resolved,e2fsprogs,rsync,iptables,fuse3,git,curl,nodejs,npm
  MODULES="$MODULES virtio_scsi sr_mod cdrom isofs"
fi
SIZE=${SIZE:-3G}

tools=(mmdebstrap mkfs.ext4 ssh-keygen)
[ "$variant" = lima ] && tools+=(qemu-img)
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null || { echo "build-image.sh: $t missing (make setup installs it)" >&2; exit 1; }
done
mkdir -p "$out"
work=$(mktemp -d "${out%/}.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

[ "$variant" = vm ] && ssh-keygen -q -t ed25519 -N "" -C cowork-vm-harness -f "$work/id_ed25519"

# A small initramfs with just what a virtio guest needs to mount its root,
# configured before the kernel's postinst generates it (once).
hook_initramfs='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf "MODULES=list\nCOMPRESS=zstd\n" >"$1/etc/initramfs-tools/conf.d/cowork.conf"
printf "%s\n" '"$MODULES"' >"$1/usr/share/initramfs-tools/modules.d/cowork"'

mmdebstrap --variant=apt --mode=root --format=directory \
  --include="$PACKAGES" \
  --essential-hook="$hook_initramfs" \
  "$SUITE" "$root" "$MIRROR"

# --- guest configuration -----------------------------------------------------
printf '/dev/vda\t/\text4\terrors=remount-ro,noatime\t0\t1\n' >"$root/etc/fstab"
mkdir -p "$root/etc/ssh/sshd_config.d"
if [ "$variant" = vm ]; then
  echo cowork-vm >"$root/etc/hostname"
  printf '127.0.1.1\tcowork-vm\n' >>"$root/etc/hosts"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
  cat >"$root/etc/ssh/sshd_config.d/cowork.conf" <<'CONF'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
CONF
else
  # Lima's cloud-init data sets the hostname, the user and its key. Only NoCloud is
  # probed (no metadata service is dialled); the network is the DHCP unit below.
  rm -f "$root/etc/hostname"
  printf '%s\n' 'datasource_list: [NoCloud, None]' 'network: {config: disabled}' \
    >"$root/etc/cloud/cloud.cfg.d/90-cowork.cfg"
  printf '%s\n' 'PasswordAuthentication no' 'UseDNS no' >"$root/etc/ssh/sshd_config.d/cowork.conf"
  # Names resolve through systemd-resolved and the DNS server DHCP names (Lima's).
  ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
  chroot "$root" systemctl enable systemd-resolved >/dev/null 2>&1
fi
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
files=(vmlinuz initrd.img kernel-version)
if [ "$variant" = vm ]; then
  files+=(rootfs.img id_ed25519 id_ed25519.pub)
else
  # qcow2: Lima copies the image into each instance, and would copy a raw file whole.
  qemu-img convert -q -O qcow2 "$work/rootfs.img" "$work/disk.qcow2"
  echo "root=/dev/vda rw console=ttyS0 ds=nocloud quiet loglevel=4 systemd.show_status=1" >"$work/cmdline"
  files+=(disk.qcow2 cmdline)
fi
for f in "${files[@]}"; do
  mv "$work/$f" "$out/$f"
done
echo "built guest image in $out (kernel $kver)"
