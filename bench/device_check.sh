#!/usr/bin/env bash
# The H100 device check, one command on a fresh box (no network):
#   bash bench/device_check.sh [OUT]        (OUT defaults to $OUT, else ./out/device_check)
# build the extension with all cores → GPU tests alongside compute-sanitizer memcheck on every compiled kernel →
# the benches (JSON, markdown, plots). Every phase is time-boxed so the whole run ends inside
# L3K_CHECK_BUDGET_S (default 470 s, under 8 minutes); the bench gets what is left and marks rows it could
# not reach as skipped. Wheels the image lacks (nvidia-cutlass for the headers, liger-kernel as a peer) are
# installed from .whl/ (fetch them with bench/fetch_wheels.sh where there is network).
# Writes at most 8 files under OUT, no subfolders: <stem>.json, <stem>.md, plots.tar.gz, logs.tar.gz,
# summary.txt, where <stem> = <date>_<gpu>_<commit> as bench/results/README.md names results.
# Knobs: L3K_BENCH_ARGS (extra `l3k bench` flags, e.g. "--quick" or "--ops norm,gemm"), MAX_JOBS,
# L3K_CHECK_BUDGET_S, L3K_SKIP (comma list of phases to skip: build,tests,sanitize,bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-out/device_check}}
mkdir -p "$OUT_DIR"
LOGS=$(mktemp -d /tmp/l3k_logs.XXXX)
PLOTS=$(mktemp -d /tmp/l3k_plots.XXXX)
START=$(date +%s)
DEADLINE=$((START + ${L3K_CHECK_BUDGET_S:-470}))
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-python3}
SUMMARY="$LOGS/summary.txt"
FAILED="$LOGS/failed"  # a file, not a variable: phases may run in the background

left() { echo $((DEADLINE - $(date +%s))); }
skipped() { [[ ",${L3K_SKIP:-}," == *",$1,"* ]]; }

# phase NAME CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left), log to $LOGS/NAME.log
phase() {
  local name=$1 cap=$2
  shift 2
  local budget t0 rc
  budget=$(left)
  ((budget > cap)) && budget=$cap
  if skipped "$name"; then
    echo "phase $name: skipped (L3K_SKIP)" | tee -a "$SUMMARY"
    return 0
  fi
  if ((budget < 10)); then
    echo "phase $name: not run, the time budget is spent" | tee -a "$SUMMARY"
    touch "$FAILED"
    return 1
  fi
  echo "=== phase $name (up to ${budget} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  if ((rc == 0)); then
    echo "phase $name: ok in ${took} s" | tee -a "$SUMMARY"
  else
    [[ $rc == 124 || $rc == 137 ]] && rc="$rc (timed out after ${budget} s)"
    echo "phase $name: FAILED rc=$rc in ${took} s; last lines:" | tee -a "$SUMMARY"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/    /' >"$LOGS/$name.tail"
    tee -a "$SUMMARY" <"$LOGS/$name.tail"
    touch "$FAILED"
  fi
  return 0
}

# ----------------------------------------------------------------------------------- environment
{
  echo "device check $(date -u +%FT%TZ) on $(hostname), budget ${L3K_CHECK_BUDGET_S:-470} s, MAX_JOBS=$MAX_JOBS"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} 2>&1 | tee "$LOGS/env.log"

if compgen -G ".whl/*.whl" >/dev/null; then
  t0=$(date +%s)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "phase wheels: $(ls .whl | tr '\n' ' ')in $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
else
  echo "phase wheels: no .whl/ folder (the build needs nvidia-cutlass; liger rows will say not installed)" | tee -a "$SUMMARY"
fi

# ------------------------------------------------------------------------------------------ phases
phase build 300 env LLAMA3_KERNELS_CUDA=1 $PY -m pip install -v --no-build-isolation --no-deps -e .
$PY -c "import json, llama3_kernels as l; print(json.dumps(l.info(), indent=1))" 2>&1 | tee "$LOGS/info.log"

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
SAN_ARGS=(--tool memcheck --error-exitcode 1 --print-limit 50)
# instrument only this project's kernels (namespace l3k, CUTLASS's included) when the tool can filter: faster
"$SAN" --help 2>/dev/null | grep -q -- "--kernel-name" && SAN_ARGS+=(--kernel-name kns=l3k)
# tests and the sanitizer only check correctness, so they share the GPU; the benches run alone afterwards
phase sanitize 150 "$SAN" "${SAN_ARGS[@]}" $PY bench/sanitize_cases.py &
phase tests 150 $PY -m pytest -m cuda tests -q -rfEs -p no:cacheprovider
wait

STEM=$($PY - <<'EOF'
import datetime, re, subprocess, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
gpu = re.sub(r"[^a-z0-9]+", "-", gpu.lower().replace("nvidia", "")).strip("-")
try:
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
print(f"{datetime.date.today():%Y-%m-%d}_{gpu}_{commit or 'nocommit'}")
EOF
)
BENCH_S=$(($(left) - 25))
phase bench $((BENCH_S + 15)) $PY -m llama3_kernels.cli bench --budget-s "$BENCH_S" --no-progress \
  --json "$OUT_DIR/$STEM.json" --markdown "$OUT_DIR/$STEM.md" --plot "$PLOTS" ${L3K_BENCH_ARGS:-}

# ------------------------------------------------------------------------------------------ outputs
echo "total: $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
cp "$SUMMARY" "$OUT_DIR/summary.txt"
compgen -G "$PLOTS/*.png" >/dev/null && tar -czf "$OUT_DIR/plots.tar.gz" -C "$PLOTS" .
tar -czf "$OUT_DIR/logs.tar.gz" -C "$LOGS" .
[[ -f "$OUT_DIR/$STEM.md" ]] && cat "$OUT_DIR/$STEM.md"
echo
cat "$SUMMARY"
ls -la "$OUT_DIR"
[[ -e "$FAILED" ]] && exit 1
exit 0
