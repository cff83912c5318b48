#!/usr/bin/env bash
# The one-command GPU check, run from the repository root on a CUDA machine:
#
#     bash perf/gpu_check.sh
#
# 1. prints nvidia-smi and the device (name, capability, SMs, memory, torch/CUDA/Triton versions);
# 2. runs the kernel tests COMPILED on the GPU (TREADLE_TEST_DEVICE=cuda, see tests/conftest.py),
#    the Triton-backend forward against the torch backend, and the static-plan / CUDA-graph tests;
# 3. runs perf/bench_kernels.py and perf/bench_gpu_decode.py (1B- and 7B-class random weights,
#    batch 1 and 8, tree verify of 1-64 nodes).
# Results, named with the device: perf/results/{bench_kernels,bench_gpu_decode,gpu_check}-<gpu>.*
# (json, csv, png), and the whole log in perf/results/gpu_check-<gpu>.log. Where $OUT is set (the
# lent device machine: what is written there comes back), the log and results are written there too.
# Every stage runs under `timeout` (seconds, overridable: GPU_CHECK_TESTS_S, GPU_CHECK_KERNELS_S,
# GPU_CHECK_DECODE_S); the defaults add up to under 8 minutes. A stage that fails or times out does
# not stop the later ones; the exit status is 1 if any did, 2 if no usable Python was found.
#
# Python: $TREADLE_PYTHON if set, else the first of .venv/bin/python, python3, python that imports
# torch and triton and sees a CUDA device (on the lent H200 machine: its own python3, with torch
# and triton; nothing can be installed there). Wheels in .whl/ (carried, see the device README) are
# installed into a temporary directory first. `treadle` is imported from this checkout.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
TESTS_S=${GPU_CHECK_TESTS_S:-180}
KERNELS_S=${GPU_CHECK_KERNELS_S:-120}
DECODE_S=${GPU_CHECK_DECODE_S:-150}
RESULTS=$REPO/perf/results
WORK=$(mktemp -d /tmp/treadle_gpu_check.XXXXXX)
LOG=$WORK/gpu_check.log
DEVICE=unknown_device  # the GPU's name as a file-name part, once known
mkdir -p "$RESULTS"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"

section() { printf '\n===== %s (%s) =====\n' "$1" "$(date -u +%H:%M:%S)"; }

copy_out() {  # what $OUT holds comes back from the lent machine, even after a timeout
    [ -n "${OUT:-}" ] || return 0
    cp "$LOG" "$OUT/gpu_check-$DEVICE.log" 2>/dev/null
    for f in "$RESULTS"/bench_kernels-"$DEVICE".* "$RESULTS"/bench_gpu_decode-"$DEVICE".* \
             "$RESULTS"/gpu_check-"$DEVICE".json; do
        [ -e "$f" ] && cp "$f" "$OUT/"
    done
    return 0
}

check() {
# --- Python --------------------------------------------------------------------------------
section "python"
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing the carried wheels in .whl/ into $WORK/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
# `import treadle` -> this checkout (the repository root is the package).
mkdir -p "$WORK/pkg" && ln -sfn "$REPO" "$WORK/pkg/treadle"
export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

PROBE='
import sys
try:
    import torch
except Exception as e:
    sys.exit(f"no torch ({e})")
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
try:
    import triton
except Exception as e:
    sys.exit(f"torch {torch.__version__} sees the GPU, but no triton ({e})")
'
PY=
for cand in ${TREADLE_PYTHON:-} .venv/bin/python python3 python; do
    command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
    if why=$("$cand" -P -c "$PROBE" 2>&1); then
        PY=$cand
        break
    fi
    echo "skipping $cand: ${why##*$'\n'}"
done
if [ -z "$PY" ]; then
    echo "gpu_check: no Python here imports torch with CUDA and triton and sees a GPU (above, why"
    echo "each was skipped). Set TREADLE_PYTHON to one that does, or carry the missing packages as"
    echo "wheels in .whl/ (see the device machine's README); nothing was run."
    return 2
fi
echo "python: $(command -v "$PY" || echo "$PY")"
missing=$("$PY" -P -c '
import importlib.util
need = ["pytest", "hypothesis", "transformers", "safetensors", "numpy", "tokenizers",
        "sentencepiece", "jinja2", "matplotlib"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))')
[ -n "$missing" ] && echo "WARNING: missing Python packages (tests or plots that need them fail): $missing"
"$PY" -P -c 'import treadle' || { echo "gpu_check: cannot import treadle"; return 2; }

# --- the device --------------------------------------------------------------------------------
section "device"
nvidia-smi || echo "(nvidia-smi failed or is not installed)"
# The facts on stderr (into the log), the name as a file-name part on stdout.
DEVICE=$("$PY" -P -c '
import platform, re, sys, torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB", file=sys.stderr)
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}", file=sys.stderr)
print(re.sub(r"[^A-Za-z0-9.-]+", "_", p.name).strip("_"))') || return 2
echo "results are named with: $DEVICE"
echo "$DEVICE" >"$WORK/device"

STAGES=()
run_stage() {  # name, seconds, command...
    local name=$1 limit=$2 t0 rc
    shift 2
    section "$name (timeout ${limit}s)"
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "gpu_check: $name ran past ${limit}s and was stopped"
    STAGES+=("$name $rc $(( $(date +%s) - t0 ))")
    echo "gpu_check: $name -> exit $rc in $(( $(date +%s) - t0 ))s"
    copy_out
}

# --- tests, compiled on the GPU -------------------------------------------------------------
PYTEST_OPTS=()
"$PY" -P -c 'import xdist' 2>/dev/null && PYTEST_OPTS=(-n 4)  # the Triton compiles are CPU-bound
# One hung test fails alone instead of eating the stage (and the report with it).
"$PY" -P -c 'import pytest_timeout' 2>/dev/null && PYTEST_OPTS+=(--timeout=90)
run_stage tests "$TESTS_S" env TREADLE_TEST_DEVICE=cuda \
    "$PY" -P -m pytest "${PYTEST_OPTS[@]}" -rfEs --junitxml="$WORK/gpu_tests.xml" \
    tests/kernels tests/graph/test_triton_backend.py tests/runtime/test_executor.py

# --- benchmarks -----------------------------------------------------------------------------
run_stage bench_kernels "$KERNELS_S" "$PY" -P perf/bench_kernels.py
run_stage bench_gpu_decode "$DECODE_S" "$PY" -P perf/bench_gpu_decode.py

# --- summary ----------------------------------------------------------------------------------
section "summary"
"$PY" -P - "$RESULTS/gpu_check-$DEVICE.json" "$WORK/gpu_tests.xml" "${STAGES[@]}" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
import torch, triton

out, junit, stages = sys.argv[1], sys.argv[2], sys.argv[3:]
summary = {
    "check": "perf/gpu_check.sh", "gpu": torch.cuda.get_device_name(),
    "python": platform.python_version(), "torch": torch.__version__,
    "cuda": torch.version.cuda, "triton": triton.__version__,
    "stages": [dict(zip(("stage", "exit", "seconds"), (n, int(rc), int(s))))
               for n, rc, s in (line.split() for line in stages)],
}
try:
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s
              if c.find("failure") is not None or c.find("error") is not None]
    summary["tests"] = {**counts, "failed": failed}
except (OSError, ET.ParseError) as e:
    summary["tests"] = {"report": f"none ({e})"}
with open(out, "w") as f:
    f.write(json.dumps(summary, indent=2) + "\n")
print(f"{'stage':<18} {'exit':>4} {'seconds':>8}")
for s in summary["stages"]:
    print(f"{s['stage']:<18} {s['exit']:>4} {s['seconds']:>8}")
t = summary["tests"]
if "tests" in t:
    print(f"tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, "
          f"{t['skipped']} skipped" + "".join(f"\n  FAILED {n}" for n in t["failed"]))
print(f"saved {out}")
EOF
local status=0 s
for s in "${STAGES[@]}"; do
    set -- $s
    [ "$2" -eq 0 ] || status=1
done
echo "gpu_check: exit $status"
return $status
}

check 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ -s "$WORK/device" ]; then
    DEVICE=$(cat "$WORK/device")
    cp "$LOG" "$RESULTS/gpu_check-$DEVICE.log"
fi
copy_out
rm -rf "$WORK"
exit "$status"
