#!/usr/bin/env bash
# `make run`: the main job on a machine without a VM — start the embedded local
# agent and drive it with coworkctl (run, stream, pipe stdin, copy files).
set -euo pipefail
cd "$(dirname "$0")/.."
ctl=".venv/bin/coworkctl"
export COWORK_TARGET=local
say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say coworkctl local up
$ctl local up
say coworkctl info
$ctl info
say coworkctl exec -- uname -srm
$ctl exec -- uname -srm
say "echo 'hello from the host' | coworkctl exec -- tr a-z A-Z"
echo 'hello from the host' | $ctl exec -- tr a-z A-Z
say "coworkctl cp README.md vm:demo/README.md && coworkctl exec --cwd demo -- wc -l README.md"
$ctl cp -q README.md vm:demo/README.md
$ctl exec --cwd demo -- wc -l README.md
say "coworkctl exec -- sh -c 'exit 3'   # exit codes propagate"
set +e; $ctl exec -- sh -c 'exit 3'; rc=$?; set -e
echo "exit code: $rc"
if $ctl claude --help >/dev/null 2>&1 && [ -x .tools/claude/node_modules/.bin/claude ]; then
  echo; echo "Claude Code is installed in .tools/claude; try: coworkctl ask 'hello' (needs ANTHROPIC_API_KEY)"
fi
echo
echo "The local agent keeps running (state in ${XDG_STATE_HOME:-~/.local/state}/cowork). Stop it with: $ctl local down"
