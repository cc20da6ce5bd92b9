#!/usr/bin/env bash
# Real Lima for the Lima tests, pinned and project-local:
#   .tools/bin/limactl                      (built from the Go module)
#   .tools/share/lima/templates/            (`base: template:_images/...` needs them)
#   .tools/share/lima/lima-guestagent.Linux-<arch>  (`limactl create` needs it)
# limactl finds share/lima beside its own bin/ directory, like a real install.
# Also shellcheck (Debian package), which the tests run on lima/provision/*.sh.
#
# Why not `go install ...@version`: the Go proxy answers 403 for this module's
# version list, which `go install` reads for its deprecation check; `go mod
# download` of the exact version works, so we build from the module cache.
# Idempotent: does nothing when the pinned version is already in place.
set -euo pipefail
cd "$(dirname "$0")/../.."
LIMA_VERSION=${LIMA_VERSION:-v2.2.0}
MODULE=github.com/lima-vm/lima/v2
prefix=$PWD/.tools
bin=$prefix/bin/limactl
share=$prefix/share/lima
stamp=$share/.cowork-lima-version
case "$(uname -m)" in
x86_64 | amd64) arch=x86_64 goarch=amd64 ;;
aarch64 | arm64) arch=aarch64 goarch=arm64 ;;
*) echo "30-limactl.sh: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac
agent=$share/lima-guestagent.Linux-$arch

if ! command -v shellcheck >/dev/null 2>&1; then
  echo "installing Debian package: shellcheck"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
fi

if [ -x "$bin" ] && [ -x "$agent" ] && [ -f "$share/templates/_images/ubuntu-22.04.yaml" ] &&
  [ "$(cat "$stamp" 2>/dev/null)" = "$LIMA_VERSION" ]; then
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "30-limactl.sh: Go >= 1.25 is required to build limactl $LIMA_VERSION (apt-get install golang-go, or https://go.dev/dl/)" >&2
  exit 1
fi
gov=$(go env GOVERSION | sed 's/^go//')
if ! printf '1.25\n%s\n' "$gov" | sort -V -C; then
  echo "30-limactl.sh: Go $gov is too old for Lima $LIMA_VERSION (needs >= 1.25)" >&2
  exit 1
fi

echo "building limactl $LIMA_VERSION into $prefix (go $gov; takes a few minutes)"
src=$(go mod download -json "$MODULE@$LIMA_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$src" ] || [ ! -d "$src" ]; then echo "30-limactl.sh: go mod download $MODULE@$LIMA_VERSION failed" >&2; exit 1; fi
ldflags="-s -w -X $MODULE/pkg/version.Version=$LIMA_VERSION"
mkdir -p "$prefix/bin" "$share"
(cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" ./cmd/limactl)
(cd "$src" && CGO_ENABLED=0 GOOS=linux GOARCH=$goarch go build -trimpath -ldflags "$ldflags" -o "$agent.tmp" ./cmd/lima-guestagent)
rm -rf "$share/templates"
cp -R "$src/templates" "$share/templates"
chmod -R u+w,a+rX "$share"
mv -f "$bin.tmp" "$bin"
mv -f "$agent.tmp" "$agent"
echo "$LIMA_VERSION" >"$stamp"

# limactl refuses to run as root: check it as nobody then.
run=("$bin")
[ "$(id -u)" = 0 ] && run=(setpriv --reuid=65534 --regid=65534 --clear-groups "$bin")
got=$(HOME=/tmp "${run[@]}" --version 2>&1) || { echo "30-limactl.sh: $bin --version failed: $got" >&2; exit 1; }
case "$got" in *"${LIMA_VERSION#v}"*) echo "$got at $bin" ;; *)
  echo "30-limactl.sh: $bin reports '$got', expected ${LIMA_VERSION#v}" >&2
  exit 1
  ;;
esac
