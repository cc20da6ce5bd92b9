#!/usr/bin/env bash
# Runs every installer in scripts/tools.d/ in name order. Each one is
# idempotent, installs into .tools/ (or Debian packages when it must) and
# fails loudly: a test never passes by skipping a missing tool.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools
for f in scripts/tools.d/*.sh; do
  [ -e "$f" ] || continue
  bash "$f"
done
