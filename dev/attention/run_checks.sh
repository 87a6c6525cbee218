#!/usr/bin/env bash
# Device check for the dev/attention ladder, one short script for an H100 session: build (unless BIN exists),
# host layout self-test, short-shape correctness under a hang timeout, sanitizers on tiny shapes, then every shape
# with timing. Everything is printed and copied to $LOG (default: $OUT/v1_results.txt, else ./v1_results.txt).
#   bash dev/attention/run_checks.sh
set -uo pipefail
cd "$(dirname "$0")"
BIN=${BIN:-./v1_wgmma_fwd}
LOG=${LOG:-${OUT:-.}/v1_results.txt}

run() {
  echo "== $*"
  "$@"
  local rc=$?
  echo "== rc=$rc"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1
  if [ ! -x "$BIN" ]; then
    run make || exit 1
  fi
  run "$BIN" --layout-check || exit 1
  # Short shapes first: a hang or wrong values show up in seconds.
  run timeout 120 "$BIN" --check-only --max-seqlen 1000 || exit 1
  if command -v compute-sanitizer >/dev/null; then
    run timeout 240 compute-sanitizer --tool memcheck "$BIN" --check-only --max-seqlen 129
    run timeout 240 compute-sanitizer --tool racecheck "$BIN" --check-only --max-seqlen 17
  else
    echo "== compute-sanitizer not found: memcheck/racecheck skipped"
  fi
  run timeout 300 "$BIN"
} 2>&1 | tee "$LOG"
