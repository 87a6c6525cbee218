#!/usr/bin/env bash
# Device check for the dev/attention ladder, one short script for an H100 session. For each version (default: every
# built vN_* binary here, oldest first; or VERSIONS="v2_wgmma_fwd ..."): host layout self-test, short-shape
# correctness under a hang timeout, compute-sanitizer (memcheck, racecheck, synccheck) on tiny shapes, then every
# shape with timing. A version that fails its short check skips the rest. Each log goes to $OUT/<version>.txt
# (else ./<version>.txt). Builds first (make) when a binary is missing.
set -uo pipefail
cd "$(dirname "$0")"
LOGDIR=${OUT:-.}

run() {
  echo "== $*"
  "$@"
  local rc=$?
  echo "== rc=$rc"
  return $rc
}

check_version() {
  local bin=./$1
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1
  run "$bin" --layout-check || return 1
  # Short shapes first: a hang or wrong values show up in seconds.
  run timeout 120 "$bin" --check-only --max-seqlen 1000 || return 1
  if command -v compute-sanitizer >/dev/null; then
    run timeout 240 compute-sanitizer --tool memcheck "$bin" --check-only --max-seqlen 129
    run timeout 240 compute-sanitizer --tool racecheck "$bin" --check-only --max-seqlen 17
    run timeout 240 compute-sanitizer --tool synccheck "$bin" --check-only --max-seqlen 129
  else
    echo "== compute-sanitizer not found: memcheck/racecheck/synccheck skipped"
  fi
  run timeout 300 "$bin"
}

versions=${VERSIONS:-$(ls v[0-9]*_*.cu | sed 's/\.cu$//' | sort -V)}
status=0
for v in $versions; do
  if [ ! -x "./$v" ]; then
    run make "$v" || { status=1; continue; }
  fi
  check_version "$v" 2>&1 | tee "$LOGDIR/$v.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
