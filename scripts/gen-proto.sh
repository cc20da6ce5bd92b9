#!/usr/bin/env bash
# The one generator of Python code and .pyi stubs from proto/ (into cowork/agent/v1;
# cowork/defaults.py beside it is hand-written).
# usage: gen-proto.sh PYTHON OUTDIR   (generate into OUTDIR)
#        gen-proto.sh PYTHON --check  (fail if the committed code is stale, or if proto/
#                                      changed without a PROTOCOL_VERSION bump: proto_lock.py)
set -euo pipefail
py=$1; out=$2
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(dirname "$py")
gen() {
  local dest=$1
  mkdir -p "$dest/cowork/agent/v1"
  PATH="$bin:$PATH" "$py" -m grpc_tools.protoc -I "$here/proto" \
    --python_out="$dest" --grpc_python_out="$dest" \
    --mypy_out=quiet:"$dest" --mypy_grpc_out=quiet:"$dest" \
    "$here"/proto/cowork/agent/v1/*.proto
  touch "$dest/cowork/agent/__init__.py" "$dest/cowork/agent/v1/__init__.py"
}
if [ "$out" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  gen "$tmp"
  if ! diff -r -q "$tmp/cowork/agent" "$here/cowork/agent" >/dev/null; then
    diff -r "$tmp/cowork/agent" "$here/cowork/agent" | head -20 >&2
    echo "generated code in cowork/ is stale: run 'make proto' and commit" >&2
    exit 1
  fi
  echo "generated code is up to date"
  "$py" "$here/scripts/proto_lock.py" check --root "$here"
else
  gen "$out"
  # A reminder, not a failure: the lock is written on purpose, with `make proto-lock`.
  "$py" "$here/scripts/proto_lock.py" status --root "$here"
fi
