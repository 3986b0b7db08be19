#!/usr/bin/env bash
# The one script a 15-minute GPU session runs whole (about 9 minutes of wall time).
#
#   bash benchmarks/device_run.sh            # on the GPU machine; results under $OUT
#   bash benchmarks/device_run.sh --dry-run  # anywhere: the CPU-runnable stages on a tiny shape
#
# Device call (the wheels are git-ignored, so carry them):
#   run(command="bash benchmarks/device_run.sh", carry=["benchmarks/wheels"], timeout_s=600)
#
# Stages, most important first; each has a time limit and is skipped when the remaining budget is
# too small, and every `pipo bench` writes its JSON after each row, so a cut-off keeps what landed:
#   1. card, driver, torch; install carried wheels (benchmarks/wheels: FlexGen 0.1.8 and gguf with
#      --no-deps, attrs if missing; fetch them with benchmarks/fetch_wheels.sh: `pip download --no-deps flexgen==0.1.8 attrs
#      gguf==0.19.0 aiofiles==25.1.0 -d benchmarks/wheels`, ~320 KB); check pipo's imports
#   2. GPU test tier (pytest -m gpu)
#   3. int4 kernel bench (benchmarks/bench_int4.py)
#   4. quick: OPT-1.3B shape, all three schedules + FlexGen
#   5. W1, W2, W3: OPT-6.7B shape, prompt 512, gen 32, batch 8x4 (6 GiB cap on W1/W2):
#      pipo's schedule + FlexGen (W1 also writes a Chrome trace + timeline PNG of one decode step)
#   6. W1 again with the flexgen and sequential schedules, if time is left
# Files under $OUT (the device tool returns at most 8): device_run.log, quick.json, w1.json,
# w2.json, w3.json, w1_schedules.json, bench_int4.json, timeline_W1_pipo.png (the Chrome traces
# stay in /tmp/pipo-traces: the file limit).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-540}
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
START_S=$(date +%s)
OUT=${OUT:-out/device}
mkdir -p "$OUT"
LOG="$OUT/device_run.log"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_run.sh: no CUDA device here (torch.cuda.is_available() is False); run it on the GPU machine, or pass --dry-run" >&2
    exit 2
fi

FAILED=()
say() { echo "[$(( $(date +%s) - START_S ))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S MIN_S COMMAND...: run COMMAND with at most LIMIT_S (less if the budget is
# short); skip it when fewer than MIN_S seconds remain. Output goes to the screen and the log.
stage() {
    local name=$1 limit=$2 min=$3; shift 3
    local left=$(( BUDGET_S - ($(date +%s) - START_S) ))
    if [ "$left" -lt "$min" ]; then
        say "SKIP $name (${left}s left, needs ${min}s)"
        FAILED+=("$name:skipped"); return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "START $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    say "END $name: exit $code"
    [ "$code" = 0 ] || FAILED+=("$name:$code")
}

say "pipo device run, dry_run=$DRY_RUN, budget ${BUDGET_S}s, out $OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  nproc; free -g | head -2; } | tee -a "$LOG"

if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    wheels=()
    for w in benchmarks/wheels/*.whl; do
        case "$(basename "$w")" in
            attrs-*) "$PY" -c 'import attr' 2>/dev/null || wheels+=("$w") ;;  # FlexGen needs attrs
            *) wheels+=("$w") ;;  # flexgen 0.1.8 (--no-deps), gguf (collected by the test suite)
        esac
    done
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pipo-site \
        "${wheels[@]}" 2>&1 | tee -a "$LOG" && export PYTHONPATH="$PYTHONPATH:/tmp/pipo-site"
fi
"$PY" -c 'import aiofiles, networkx, numba, safetensors, tokenizers, gguf' 2>&1 | tee -a "$LOG" \
    && say "pipo's dependencies importable" || say "a pipo dependency is missing: carry its wheel"
"$PY" -c 'import flexgen' 2>/dev/null && say "flexgen importable" || say "flexgen NOT importable: FlexGen rows will be errors"

BENCH=("$PY" -m pipo.cli bench --log "$LOG")
if [ "$DRY_RUN" = 1 ]; then
    DEV=(--device cpu)
    SMALL=(--shape tiny-opt --prompt-len 16 --gen-len 4 --batch 4 --micro-batch 2)
    BIG=("${SMALL[@]}")
    FLEXGEN=()
else
    DEV=(--device cuda)
    SMALL=()
    BIG=()
    FLEXGEN=(--baselines flexgen --baseline-timeout 150)
fi
TRACES=/tmp/pipo-traces

stage gpu-tests 75 30 "$PY" -m pytest -q -m gpu --continue-on-collection-errors -p no:cacheprovider tests
if [ "$DRY_RUN" = 0 ]; then
    stage int4-kernels 45 20 "$PY" benchmarks/bench_int4.py --repeats 10 --out "$OUT/bench_int4.json"
fi
stage quick 90 40 "${BENCH[@]}" "${DEV[@]}" --workload quick "${SMALL[@]}" --schedules pipo,flexgen,sequential \
    "${FLEXGEN[@]}" --out "$OUT/quick.json"
stage W1 150 90 "${BENCH[@]}" "${DEV[@]}" --workload W1 "${BIG[@]}" --schedules pipo "${FLEXGEN[@]}" \
    --trace-dir "$TRACES" --out "$OUT/w1.json"
stage W2 120 80 "${BENCH[@]}" "${DEV[@]}" --workload W2 "${BIG[@]}" --schedules pipo "${FLEXGEN[@]}" \
    --out "$OUT/w2.json"
stage W3 120 80 "${BENCH[@]}" "${DEV[@]}" --workload W3 "${BIG[@]}" --schedules pipo "${FLEXGEN[@]}" \
    --out "$OUT/w3.json"
stage W1-other-schedules 120 60 "${BENCH[@]}" "${DEV[@]}" --workload W1 "${BIG[@]}" \
    --schedules flexgen,sequential --out "$OUT/w1_schedules.json"

[ -f "$TRACES/timeline_W1_pipo.png" ] && cp "$TRACES/timeline_W1_pipo.png" "$OUT/"
say "files: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "done with problems: ${FAILED[*]}"
    exit 1
fi
say "done: every stage passed"
