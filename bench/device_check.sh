#!/usr/bin/env bash
# The H100 device check: one command on a fresh, offline box. Build the extension, run the GPU tests next to
# compute-sanitizer (memcheck on every kernel family, racecheck on the shared-memory ones), then the benches.
#
# THE NEXT SESSION'S CALL (15 min of device time in all, start-up included: make exactly one):
#   1. Here, first:   bash bench/fetch_wheels.sh        (wheels into .whl/, and .whl/COMMIT = HEAD; commit first,
#                                                       so the results name a commit that exists)
#   2. The tool call, nothing else on the machine before it (no probing call: each start costs minutes):
#        run(command='bash bench/device_check.sh "$OUT"', carry=[".whl"], timeout_s=590)
#      (kind left out: an H100, or an H200 if none opens; the GPU's name goes into every file name and row)
#      Faster (what the 2026-11-27 session did): build here first with `bash bench/build_cp312.sh` and
#      `make -C dev/attention`, then
#        run(command='L3K_PREBUILT=1 bash bench/device_check.sh "$OUT"', timeout_s=590, carry=[".whl",
#            "python/llama3_kernels/_C.cpython-312-x86_64-linux-gnu.so", "dev/attention/v1_wgmma_fwd",
#            "dev/attention/v2_wgmma_fwd", "dev/attention/v3_wgmma_bwd"])
#      A start took ~40 s there; the whole run with the build skipped ~230 s then (more phases since: expect
#      ~400-500 s), leaving room for a second call after a fix (give_back in between: idle time counts). The
#      sm90gate phase runs the never-run Hopper attention kernels standalone first, then (sm90tests) their GPU
#      tests in a process of their own; clustergate, gemvgate, cegate, ropegate, dqgate and pdlgate do the same for
#      the decode attention's cluster merge, the decode GEMV, cross_entropy, rope, the backward's fused dQ and PDL
#      (default paths, never run on a GPU when written; tests/test_emu.py runs their code on the CPU emulator). A kernel that fails is kept
#      out of the rest of the run (tests, sanitizer, bench), so a pipeline hang or a fault cannot take it down.
#   3. The files come back read-only under the reply's files_at. Commit the two results files unchanged:
#        cp <files_at>/<stem>.json <files_at>/<stem>.md bench/results/
#        git add bench/results/<stem>.* && git commit -m "bench: <gpu> results of <commit>" -- bench/results/<stem>.*
#      <stem> = <UTC date>_<gpu>_<commit7>, e.g. 2026-11-28_h100-80gb-hbm3_1a2b3c4 (bench/results/README.md).
#      summary.txt (also the end of the reply) says which phases passed; logs.tar.gz holds every log (build,
#      tests, each sanitizer process, bench); plots.tar.gz one PNG per family. Don't commit those; report
#      failures from them. Then give_back (unless rerunning at once with L3K_SKIP / L3K_BENCH_ARGS below).
#
# Time: phases are capped so the script ends inside L3K_CHECK_BUDGET_S (default 520 s; the 590 s timeout
# leaves slack). Build ≤ 240 s (about 100 s with 16 jobs; none with L3K_PREBUILT=1), tests ∥ sanitizer ≤ 150 s
# (about 45 s), then the bench: this project's rows and the eager/library peers first, the compiled peers
# (torch.compile, FlexAttention) in a second pass, each impl capped at 90 s; it rewrites its JSON and markdown
# after every row, so a cut leaves every finished row. It leaves 200 s for the leads after it: ncu profile
# ≤ 60 s, the GEMM tile-order sweep ≤ 60 s, the step trace ≤ 60 s, the dev/attention ladder ≤ 150 s (caps, not
# costs; what is left when they start). A failing phase never stops the next one. With more device time, two
# calls see more: L3K_SKIP=profile,sweep,trace,dev first (the bench gets everything), then
# L3K_SKIP=build,tests,sanitize,bench (the leads alone).
# Writes at most 7 files into OUT (no subfolders): <stem>.json, <stem>.md, summary.txt, logs.tar.gz,
# plots.tar.gz (+ a <stem>.*.tmp if the bench was killed mid-write). summary.txt and logs.tar.gz are
# refreshed after every phase.
# Knobs: L3K_CHECK_BUDGET_S; L3K_BENCH_OPS (the bench's families, in run order); L3K_SKIP (comma list of phases to skip: build,sm90gate,sm90tests,clustergate,gemvgate,cegate,ropegate,dqgate,pdlgate,tests,sanitize,profile,sweep,trace,dev,bench);
# L3K_BENCH_ARGS (extra `l3k bench` flags: "--quick", "--ops norm,gemm", "--no-compiled"); MAX_JOBS
# (default: all cores); L3K_SANITIZE (default memcheck,racecheck); PYTHON (default python3); L3K_PREBUILT=1 (use
# a carried python/llama3_kernels/_C.cpython-312-*.so built here with Python 3.12: see bench/build_cp312.sh).
# Dry run on a machine without a GPU: L3K_SKIP=build,sanitize L3K_BENCH_ARGS="--quick --ops norm" bash
# bench/device_check.sh /tmp/dc   (the GPU tests skip, the bench runs the CPU tier; checks the plumbing).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${1:-${OUT:-out/device_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOGS=$(mktemp -d /tmp/l3k_logs.XXXX)
PLOTS=$(mktemp -d /tmp/l3k_plots.XXXX)
START=$(date +%s)
BUDGET=${L3K_CHECK_BUDGET_S:-520}
DEADLINE=$((START + BUDGET))
# offline: pip must never wait on an index or its own version check (each retry costs seconds there)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PY=${PYTHON:-python3}
SUMMARY="$LOGS/summary.txt"
FAILED="$LOGS/failed" # a file, not a variable: phases may run in the background

left() { echo $((DEADLINE - $(date +%s))); }
skipped() { [[ ",${L3K_SKIP:-}," == *",$1,"* ]]; }
say() { echo "$*" | tee -a "$SUMMARY"; }

# copy what exists so far into OUT: a kill at any point still returns the summary and the logs
snapshot() {
  cp "$SUMMARY" "$OUT_DIR/summary.txt" 2>/dev/null
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  return 0
}

# phase NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left), log to $LOGS/NAME.log
phase() {
  local name=$1 cap=$2
  shift 2
  local budget t0 rc took
  budget=$(left)
  ((budget > cap)) && budget=$cap
  if skipped "$name"; then
    say "phase $name: skipped (L3K_SKIP)"
    return 0
  fi
  if ((budget < 10)); then
    say "phase $name: not run, the time budget is spent"
    touch "$FAILED"
    return 0
  fi
  echo "=== phase $name (up to ${budget} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    say "phase $name: ok in ${took} s"
  else
    [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timed out after ${budget} s)"
    say "phase $name: FAILED rc=$rc in ${took} s; last lines of $name.log:"
    tail -n 25 "$LOGS/$name.log" | cut -c1-300 | sed 's/^/    /' | tee -a "$SUMMARY"
    touch "$FAILED"
  fi
  snapshot
  return 0
}

# ----------------------------------------------------------------------------------- environment
# fetch_wheels.sh stamps HEAD into .whl/COMMIT right before the call: trust it first (the box's copy of .git
# was seen naming an older commit, "dirty", on the second call of a session)
if [[ -f .whl/COMMIT ]]; then
  COMMIT=$(head -n 1 .whl/COMMIT)
else
  COMMIT=$(git rev-parse HEAD 2>/dev/null) || COMMIT=""
  [[ -n $COMMIT && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && COMMIT="$COMMIT dirty"
fi
export L3K_COMMIT=${COMMIT:-unknown} # harness.environment() falls back on it
{
  echo "device check $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET} s, MAX_JOBS=$MAX_JOBS, commit $L3K_COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem --format=csv,noheader ||
    echo "nvidia-smi failed"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], sys.executable, '| torch', torch.__version__,
'cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|setuptools|pybind11|pip|wheel|ninja|cmake|pytest-timeout) "
} 2>&1 | tee "$LOGS/env.log" | tee -a "$SUMMARY"

if compgen -G ".whl/*.whl" >/dev/null; then
  # --no-deps and --target: nothing in the image (torch above all) is replaced; PYTHONPATH puts them on the path
  t0=$(date +%s)
  if $PY -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/wheels.log" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "phase wheels: ok in $(($(date +%s) - t0)) s: $(cd .whl && echo *.whl)"
  else
    say "phase wheels: FAILED (see wheels.log): $(tail -n 3 "$LOGS/wheels.log" | tr '\n' ' ')"
    touch "$FAILED"
  fi
else
  say "phase wheels: no .whl/ folder (run bench/fetch_wheels.sh here first): no CUTLASS headers, no Liger"
fi
$PY -c "import importlib.util as u; s = u.find_spec('cutlass_library'); print('cutlass_library:',
s.submodule_search_locations[0] if s else 'NOT FOUND (the build will fail)')" 2>&1 | tee -a "$SUMMARY"
snapshot

# ------------------------------------------------------------------------------------------ phases
# Editable install: the extension lands in python/llama3_kernels/, llama3_kernels.bench maps to bench/. If
# the compile succeeded but the editable install did not (an old setuptools, say), a plain install reuses
# the same CMake build folder (only a relink) and copies the package into site-packages.
export BUILD_LOG=$LOGS/build_editable.log
# L3K_PREBUILT=1: the extension was built elsewhere for this Python and carried in (python/llama3_kernels/_C*.so,
# named in `carry`): install the package without compiling, which saves the ~100 s build.
if [[ ${L3K_PREBUILT:-0} == 1 ]] && compgen -G "python/llama3_kernels/_C.cpython-*.so" >/dev/null; then
  export LLAMA3_KERNELS_CUDA=0
  say "prebuilt extension: $(cd python/llama3_kernels && echo _C.cpython-*.so)"
else
  export LLAMA3_KERNELS_CUDA=1
fi
# shellcheck disable=SC2016  # expanded by the inner bash, from the exported PY and BUILD_LOG
phase build 240 bash -c '
  $PY -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$BUILD_LOG"
  [[ ${PIPESTATUS[0]} == 0 ]] && exit 0
  grep -q "llama3_kernels: built _C" "$BUILD_LOG" || exit 1
  echo "=== the editable install failed after a good compile: plain install"
  $PY -m pip install -v --no-build-isolation --no-deps .'
grep -h "llama3_kernels: built _C" "$LOGS/build.log" 2>/dev/null | tail -n 1 | sed 's/^ */    /' | tee -a "$SUMMARY"
$PY -c "import json, llama3_kernels as l; print(json.dumps(l.info(), indent=1))" >"$LOGS/info.log" 2>&1
"$PY" - <<'EOF' >"$LOGS/kernels.log" 2>&1 || say "import llama3_kernels FAILED: $(tail -n 1 "$LOGS/kernels.log")"
import llama3_kernels
from llama3_kernels.info import OP_KERNELS
from llama3_kernels.ops._common import has_kernel

names = sorted({n for ns in OP_KERNELS.values() for n in ns})
built = [n for n in names if has_kernel(n)]
print(f"kernels built: {len(built)}/{len(names)}" + (f"; missing: {', '.join(sorted(set(names) - set(built)))}" if len(built) < len(names) else ""))
EOF
grep "^kernels built" "$LOGS/kernels.log" | tee -a "$SUMMARY"
grep -q "^kernels built" "$LOGS/kernels.log" || touch "$FAILED"

# The opt-in Hopper attention kernels (csrc/attention/flash_{fwd,bwd}_sm90.cuh) had never run when this was
# written. Their standalone checks go first (a pipeline hang there ends at a 20 s deadline instead of stalling the
# GPU under pytest or the bench); a kernel that fails is kept out of the GPU tests, the sanitizer and the bench
# of this run (L3K_SM90_GATE names it; tests/test_attention_cuda.py, bench_attention.py and sanitize_cases.py
# read it).
# shellcheck disable=SC2016  # expanded by the inner bash
phase sm90gate 100 bash -c '
  cd dev/attention || exit 1
  failed=""
  for v in v2_wgmma_fwd:fwd v3_wgmma_bwd:bwd; do
    bin=${v%%:*}
    [[ -x $bin ]] || make "$bin" CUTLASS=/tmp/site/cutlass_library/source || { failed+="${v##*:},"; continue; }
    timeout 45 ./$bin --check-only --max-seqlen 1000; rc=$?
    echo "== $bin short check rc=$rc"
    ((rc == 0)) || failed+="${v##*:},"
  done
  echo "gate failed: ${failed%,}"
  [[ -z $failed ]]'
if skipped sm90gate; then
  L3K_SM90_GATE=""  # skipped on purpose: trust them
elif grep -q "^gate failed: " "$LOGS/sm90gate.log" 2>/dev/null; then
  L3K_SM90_GATE=$(sed -n 's/^gate failed: //p' "$LOGS/sm90gate.log" | tail -n 1)
else
  L3K_SM90_GATE="fwd,bwd"  # the gate did not get to a verdict: keep both out
fi
# then their GPU tests (fixed length and packed documents, through the ops) in their own process, under the
# phase's timeout: a hang there ends with the process, and a failure keeps both kernels out of the rest
TEST_SELECT=()
if [[ -z $L3K_SM90_GATE ]] && ! skipped sm90gate && ! skipped sm90tests; then
  phase sm90tests 150 "$PY" -m pytest -q -x -p no:cacheprovider -rf tests/test_attention_cuda.py -k sm90
  grep -qE "^[0-9]+ passed" "$LOGS/sm90tests.log" 2>/dev/null || L3K_SM90_GATE="fwd,bwd"
  TEST_SELECT=(-k "not sm90")  # they ran here; sm90tests.log has them
fi
export L3K_SM90_GATE
say "sm90 kernels kept out of this run: ${L3K_SM90_GATE:-none}"

# Kernels that run by default but had never run on a GPU when this was written: the cluster merge of the decode
# attention's splits, the decode GEMV (a fused model's decode step), cross_entropy, rope and the backward's fused dQ
# (the training step), and PDL (programmatic dependent launch of the decode kernels). Each one's tests go first, in a process of their
# own; if they fail, its switch keeps the rest of the run on the unfused ops, the reference or plain launches (a
# fault would poison the test process's CUDA context), and the main tests skip that file. The kernels' gates run
# without PDL, so that a PDL fault cannot turn a kernel off; PDL's own gate comes last, on top of them.
TEST_IGNORE=()
# (name:tests:switch:cap in s; a hang costs its cap, a pass takes 10-30 s)
for gate in clustergate:tests/test_decode_cluster_cuda.py:L3K_DECODE_CLUSTER:60 \
  gemvgate:tests/test_decode_gemv_cuda.py:L3K_DECODE_GEMV:90 cegate:tests/test_loss_cuda.py:L3K_CROSS_ENTROPY:60 \
  ropegate:tests/test_rope_cuda.py:L3K_ROPE:60 dqgate:tests/test_flash_bwd_fused_cuda.py:L3K_BWD_FUSED_DQ:60 \
  pdlgate:tests/test_pdl_cuda.py:L3K_PDL:90; do
  IFS=: read -r name file switch cap <<<"$gate"
  no_pdl=(env L3K_PDL=0)
  [[ $name == pdlgate ]] && no_pdl=()
  phase "$name" "$cap" "${no_pdl[@]}" "$PY" -m pytest -q -x -p no:cacheprovider -rf "$file"
  skipped "$name" && continue
  TEST_IGNORE+=(--ignore="$file")  # they ran in the gate; $name.log has them
  if ! grep -qE "^[0-9]+ passed" "$LOGS/$name.log" 2>/dev/null; then
    export "$switch=0"
    say "$file failed: $switch=0 for the rest of this run (the former path), see $name.log"
  fi
done

# tests and the sanitizer only check correctness, so they share the GPU; the benches run alone afterwards
TEST_ARGS=(-m cuda tests -v -rfEsP -p no:cacheprovider --continue-on-collection-errors)  # P: what passing tests print (measured ratios)
$PY -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout=60) # one hung test must not eat the phase
SAN_S=$(($(left) < 150 ? $(left) : 150))
phase sanitize 150 "$PY" bench/sanitize_cases.py --sanitize "${L3K_SANITIZE:-memcheck,racecheck}" \
  --timeout-s $((SAN_S - 10)) --log-dir "$LOGS" &
phase tests 150 "$PY" -m pytest "${TEST_ARGS[@]}" "${TEST_IGNORE[@]}" "${TEST_SELECT[@]}"
wait
{
  [[ -f $LOGS/sanitize.log ]] && grep -E "^(memcheck|racecheck) .* ok \(" "$LOGS/sanitize.log" | sed 's/^/    /'
  [[ -f $LOGS/tests.log ]] && grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$LOGS/tests.log" | head -n 40 |
    cut -c1-300 | sed 's/^/    /'
} | tee -a "$SUMMARY"
snapshot

STEM=$($PY - <<'EOF'
import datetime, os, re, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
gpu = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
commit = os.environ.get("L3K_COMMIT", "unknown").split()[0]
commit = commit[:7] if re.fullmatch(r"[0-9a-f]{7,40}", commit) else "nocommit"
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}_{gpu}_{commit}")
EOF
)
[[ -n $STEM ]] || STEM="$(date -u +%F)_unknown_nocommit"
say "results stem: $STEM"
# the bench stops starting impls after BENCH_S and caps each impl (a compile included) at 90 s, and at 20 s
# past its deadline; the phase's own cap is 50 s later still, so the JSON and markdown get written. It leaves
# LEADS_S for the lead phases after it (none when L3K_SKIP names all four).
LEADS_S=200
skipped profile && skipped sweep && skipped trace && skipped dev && LEADS_S=0
BENCH_S=$(($(left) - 60 - LEADS_S))
if ((BENCH_S < 150)); then  # the bench comes first: the leads give up what it lacks
  LEADS_S=$((LEADS_S - (150 - BENCH_S)))
  ((LEADS_S < 0)) && LEADS_S=0
  BENCH_S=$(($(left) - 60 - LEADS_S))
fi
((BENCH_S < 30)) && BENCH_S=30
read -r -a BENCH_EXTRA <<<"${L3K_BENCH_ARGS:-}"
# The issues' end-to-end targets (train MFU, decode tokens/s) first, then the kernels by how far they trail: rows
# past the budget are skipped, and the whole bench no longer fits in the ~150 s it gets after the tests.
BENCH_OPS=${L3K_BENCH_OPS:-ceiling,model,attention,gemm,loss,rope,norm,swiglu,decode,fp8}
phase bench $((BENCH_S + 50)) "$PY" -m llama3_kernels.cli bench --budget-s "$BENCH_S" --impl-timeout-s 90 \
  --ops "$BENCH_OPS" --no-progress --json "$OUT_DIR/$STEM.json" --markdown "$OUT_DIR/$STEM.md" --plot "$PLOTS" "${BENCH_EXTRA[@]}"
if [[ -f $OUT_DIR/$STEM.json ]]; then
  $PY - "$OUT_DIR/$STEM.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import collections, json, sys
doc = json.load(open(sys.argv[1]))
n = collections.Counter(x["status"] for r in doc["rows"] for x in r["results"])
ours = collections.Counter(x["status"] for r in doc["rows"] for x in r["results"] if x["ours"])
print(f"    bench: {len(doc['rows'])} rows, complete={doc['env'].get('complete')}, impls {dict(n)}, ours {dict(ours)}")
for r in doc["rows"]:
    for x in r["results"]:
        if x["ours"] and x["status"] == "error":
            print(f"    ours error: {r['key']}: {x['reason'][:160]}")
EOF
fi

# Leads for the next change, after the bench (L3K_SKIP=profile,sweep,trace,dev to drop them):
# Nsight Compute on the kernels that trail their peers (bench/profile_cases.py), and the standalone Hopper
# attention ladder (dev/attention: wgmma + TMA forward, not in the extension; its own check and timing).
NCU_SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats
  --section LaunchStats)
phase profile 60 ncu --clock-control none --target-processes all --launch-count 8 \
  --kernel-name regex:'rms_norm_(fwd|bwd)_kernel|flash_fwd_kernel|dkdv_kernel|dq_kernel|flash_fwd_sm90|dq_sm90|dkdv_sm90' \
  "${NCU_SECTIONS[@]}" \
  "$PY" bench/profile_cases.py
# the FP8 GEMM's prefill tile order (swizzle x raster) against cuBLASLt on the shapes where it trails
phase sweep 60 "$PY" bench/sweep_gemm.py
[[ -f $LOGS/sweep.log ]] && grep -E "M=|ratio" "$LOGS/sweep.log" | head -n 16 | sed 's/^/    /' | tee -a "$SUMMARY"
# which kernel groups make the end-to-end gap (a train step and a decode step, ours vs plain PyTorch eager)
phase trace 60 "$PY" bench/profile_step.py
[[ -f $LOGS/trace.log ]] && grep -E "^== |^  [a-z]" "$LOGS/trace.log" | grep -v "top " | head -n 60 |
  sed 's/^/    /' | tee -a "$SUMMARY"
# shellcheck disable=SC2016  # expanded by the inner bash
phase dev 200 bash -c '
  cd dev/attention || exit 1
  st=0
  # the named barriers of the ping-pong, on tiny shapes first (both head dims)
  [[ -x v2_wgmma_fwd ]] || make v2_wgmma_fwd CUTLASS=/tmp/site/cutlass_library/source
  timeout 45 compute-sanitizer --tool synccheck --error-exitcode 1 ./v2_wgmma_fwd --check-only --max-seqlen 129
  rc=$?; echo "== v2 synccheck rc=$rc"; ((rc == 0)) || st=1
  # each program checks every shape (the short ones first, a hang ends at its 20 s deadline), then times, head dim
  # 128 then 64 (v1, the baseline rung, at 128 only); v2 and v3 already passed their short checks in sm90gate
  for v in v1_wgmma_fwd:40:--head-dim=128 v2_wgmma_fwd:55: v3_wgmma_bwd:55:; do
    IFS=: read -r bin limit args <<<"$v"
    [[ -x $bin ]] || make "$bin" CUTLASS=/tmp/site/cutlass_library/source || { st=1; continue; }
    # shellcheck disable=SC2086  # args: empty, or one option and its value
    timeout "$limit" ./$bin ${args/=/ }; rc=$?; echo "== $bin full check + timing rc=$rc"; ((rc == 0)) || st=1
  done
  exit $st'
[[ -f $LOGS/dev.log ]] && grep -iE "tflop|fail|rc=|on nvidia|ERROR SUMMARY" "$LOGS/dev.log" | head -n 30 |
  cut -c1-200 | sed 's/^/    /' | tee -a "$SUMMARY"
snapshot

# ------------------------------------------------------------------------------------------ outputs
say "total: $(($(date +%s) - START)) s of ${BUDGET} s"
compgen -G "$PLOTS/*.png" >/dev/null && tar -czf "$OUT_DIR/plots.tar.gz" -C "$PLOTS" .
snapshot
[[ -f "$OUT_DIR/$STEM.md" ]] && head -c 6000 "$OUT_DIR/$STEM.md"
echo
cat "$SUMMARY"
ls -la "$OUT_DIR"
[[ -e "$FAILED" ]] && exit 1
exit 0
