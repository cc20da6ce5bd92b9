#!/usr/bin/env bash
# The real Claude Code CLI for the Claude tests, pinned, project-local:
# .tools/claude/node_modules/.bin/claude (never a global install).
# The npm package is a thin launcher; the CLI itself is a native binary in a
# platform package (@anthropic-ai/claude-code-linux-x64, ...) pulled in as an
# optional dependency, so optional dependencies must NOT be omitted.
# Idempotent: does nothing when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.330}
prefix=.tools/claude
bin=$prefix/node_modules/.bin/claude

have_version() {
  [ -x "$bin" ] || return 1
  local v
  v=$(DISABLE_AUTOUPDATER=1 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 timeout 30 "$bin" --version 2>/dev/null) || return 1
  [ "${v%% *}" = "$CLAUDE_CODE_VERSION" ]
}

if have_version; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "20-claude.sh: npm is required to install @anthropic-ai/claude-code (apt-get install nodejs npm)" >&2
  exit 1
fi
echo "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $prefix"
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --include=optional --save-exact \
  "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2
if ! have_version; then
  echo "20-claude.sh: $bin --version does not report $CLAUDE_CODE_VERSION after install" >&2
  [ -e "$bin" ] && DISABLE_AUTOUPDATER=1 timeout 30 "$bin" --version >&2 || true
  exit 1
fi
echo "claude $("$bin" --version) at $bin"
