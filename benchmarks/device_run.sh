#!/usr/bin/env bash
# The script a GPU session runs, in two stages of one device call each:
#
#   bash benchmarks/device_run.sh --stage smoke            # <= 5 min: is the CUDA path right? (default)
#   bash benchmarks/device_run.sh --stage full             # ~9 min: W-series + FlexGen, int4 bench
#   bash benchmarks/device_run.sh --stage spec             # ~4 min: speculation's cost side (issue 12)
#   bash benchmarks/device_run.sh --dry-run --stage smoke  # anywhere (CPU): tiny shapes, same steps
#
# Device call (the wheels are git-ignored, so carry them; fetch them with benchmarks/fetch_wheels.sh):
#   run(command="bash benchmarks/device_run.sh --stage smoke", carry=["benchmarks/wheels"], timeout_s=330)
#   run(command="bash benchmarks/device_run.sh --stage full", carry=["benchmarks/wheels"], timeout_s=600)
#   run(command="bash benchmarks/device_run.sh --stage spec", timeout_s=300)
#
# The GPU image has torch (CUDA), numba, numba-cuda, networkx, safetensors, tokenizers, aiofiles,
# transformers and accelerate; only gguf, flexgen 0.1.8 and attrs travel as wheels, installed with
# --no-deps when missing.
#
# smoke, most important first: int4 kernels' validate() (fp16 and bf16) on the card; the GPU test
#   tier (pytest -m gpu); time to pin 16 GiB and pinned H2D/D2H GB/s (benchmarks/bench_link.py);
#   `quick` (OPT-1.3B shape) with --gen-len 4, traced; W1 at --batch 8 --gen-len 4, traced.
# full: int4 kernel bench (benchmarks/bench_int4.py); quick, all three schedules + FlexGen; W1, W2,
#   W3 (OPT-6.7B shape, prompt 512, gen 32, batch 8x4, 6 GiB cap on W1/W2): pipo + FlexGen; W1 with
#   the flexgen and sequential schedules, if time is left.
# spec: the speculation tests on the card (int4 / ngram / model drafts equal plain greedy); the
#   OPT-6.7B shape at a 6 GiB cap, batch 1, streamed from host RAM: plain pass vs verify pass at
#   k = 1..16 and the int4 draft's ms per token (benchmarks/bench_spec_cost.py; the speed-up is a
#   projection from the acceptance measured on real weights on the CPU). Files: device_run.log,
#   stages.jsonl, spec_cost.json.
# Each step has a time limit and is skipped when the stage's budget is too short. Every step appends
# a line to $OUT/stages.jsonl when it ends, and every benchmark rewrites its JSON after each row, so
# a cut-off keeps what landed. At most 8 files come back from $OUT: smoke writes device_run.log,
# stages.jsonl, link.json, smoke_quick.json, smoke_w1.json and the two timeline PNGs; full writes
# device_run.log, stages.jsonl, bench_int4.json, quick.json, w1.json, w2.json, w3.json,
# w1_schedules.json (the Chrome traces stay in /tmp/pipo-traces).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash benchmarks/device_run.sh [--dry-run] [--stage smoke|full|spec] (default: smoke)" >&2; exit 2; }
DRY_RUN=0
STAGE=smoke
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --stage) [ $# -ge 2 ] || usage; STAGE=$2; shift ;;
        --stage=*) STAGE=${1#--stage=} ;;
        *) usage ;;
    esac
    shift
done
case "$STAGE" in smoke) DEFAULT_BUDGET_S=290 ;; full) DEFAULT_BUDGET_S=540 ;; spec) DEFAULT_BUDGET_S=270 ;; *) usage ;; esac
BUDGET_S=${BUDGET_S:-$DEFAULT_BUDGET_S}
START_S=$(date +%s)
OUT=${OUT:-out/device}
mkdir -p "$OUT"
LOG="$OUT/device_run.log"
STAGES="$OUT/stages.jsonl"
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# torch and CUDA are checked apart, so the message says which one is missing
if ! TORCH_INFO=$("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda, "cuda available:", torch.cuda.is_available())' 2>/dev/null); then
    echo "device_run.sh: $PY cannot import torch; install torch (a CUDA build on the GPU machine)" >&2
    exit 2
fi
if [ "$DRY_RUN" = 0 ] && [[ "$TORCH_INFO" != *"available: True" ]]; then
    echo "device_run.sh: torch is installed but sees no CUDA device ($TORCH_INFO); run it on the GPU machine, or pass --dry-run" >&2
    exit 2
fi

FAILED=()
say() { echo "[$(( $(date +%s) - START_S ))s] $*" | tee -a "$LOG"; }
record() { printf '{"stage": "%s", "step": "%s", "result": "%s", "at_s": %d}\n' \
    "$STAGE" "$1" "$2" "$(( $(date +%s) - START_S ))" >> "$STAGES"; }
skip() { say "SKIP $1 ($2)"; record "$1" "skipped: $2"; }

# step NAME LIMIT_S MIN_S COMMAND...: run COMMAND with at most LIMIT_S (less if the budget is
# short); skip it when fewer than MIN_S seconds remain. Output goes to the screen and the log.
step() {
    local name=$1 limit=$2 min=$3; shift 3
    local left=$(( BUDGET_S - ($(date +%s) - START_S) ))
    if [ "$left" -lt "$min" ]; then
        skip "$name" "${left}s left, needs ${min}s"
        FAILED+=("$name:skipped"); return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "START $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local code=${PIPESTATUS[0]}
    say "END $name: exit $code"
    record "$name" "exit $code"
    [ "$code" = 0 ] || FAILED+=("$name:$code")
}

say "pipo device run, stage $STAGE, dry_run=$DRY_RUN, budget ${BUDGET_S}s, out $OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 || true
  echo "$TORCH_INFO"
  nproc; free -g | head -2; } | tee -a "$LOG"

# missing MODULE...: the modules among MODULE... that $PY cannot find (without importing them)
missing() { "$PY" -c 'import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"; }

# carried wheels, each only when its module is missing (wheel name prefix -> module)
absent=" $(missing attr flexgen gguf) "
wheels=()
for w in benchmarks/wheels/*.whl; do
    [ -e "$w" ] || continue
    case "$(basename "$w")" in
        attrs-*) module=attr ;; flexgen-*) module=flexgen ;; gguf-*) module=gguf ;; *) continue ;;
    esac
    [[ "$absent" == *" $module "* ]] && wheels+=("$w")
done
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pipo-site \
        "${wheels[@]}" 2>&1 | tee -a "$LOG" && export PYTHONPATH="$PYTHONPATH:/tmp/pipo-site"
fi
for module in $(missing aiofiles networkx numba safetensors tokenizers gguf flexgen); do
    say "$module is NOT importable: carry its wheel (benchmarks/fetch_wheels.sh)"
done

BENCH=("$PY" -m pipo.cli bench --log "$LOG")
TRACES=/tmp/pipo-traces
if [ "$DRY_RUN" = 1 ]; then
    DEV=(--device cpu)
    SHAPE=(--shape tiny-opt --prompt-len 16 --batch 4 --micro-batch 2)
    SMOKE_W1=("${SHAPE[@]}")
    FLEXGEN=()
    GPU_TESTS=tests/runtime  # every gpu test skips on a CPU; this checks the step, quickly
    LINK=(--dry-run)
else
    DEV=(--device cuda)
    SHAPE=()
    SMOKE_W1=(--batch 8)
    FLEXGEN=(--baselines flexgen --baseline-timeout 150)
    GPU_TESTS=tests
    LINK=()
fi

kernel_check() {
    if [ "$DRY_RUN" = 1 ]; then
        skip "kernel-$1" "needs CUDA; tests/ops runs validate() in the simulator"
    else
        step "kernel-$1" 60 20 "$PY" -m "pipo.ops.kernels.$1"
    fi
}

smoke() {
    kernel_check gemv_int4
    kernel_check dequant_int4
    step gpu-tests 90 30 "$PY" -m pytest -q -m gpu --continue-on-collection-errors -p no:cacheprovider "$GPU_TESTS"
    step link 60 20 "$PY" benchmarks/bench_link.py "${LINK[@]}" --out "$OUT/link.json"
    step quick-traced 75 40 "${BENCH[@]}" "${DEV[@]}" --workload quick "${SHAPE[@]}" --gen-len 4 \
        --schedules pipo --trace-dir "$TRACES" --out "$OUT/smoke_quick.json"
    step W1-small 90 60 "${BENCH[@]}" "${DEV[@]}" --workload W1 "${SMOKE_W1[@]}" --gen-len 4 \
        --schedules pipo --trace-dir "$TRACES" --out "$OUT/smoke_w1.json"
    for png in timeline_quick_pipo.png timeline_W1_pipo.png; do
        [ -f "$TRACES/$png" ] && cp "$TRACES/$png" "$OUT/"
    done
}

full() {
    if [ "$DRY_RUN" = 1 ]; then
        skip int4-bench "needs CUDA"
    else
        step int4-bench 45 20 "$PY" benchmarks/bench_int4.py --repeats 10 --out "$OUT/bench_int4.json"
    fi
    local gen=()
    [ "$DRY_RUN" = 1 ] && gen=(--gen-len 4)
    step quick 90 40 "${BENCH[@]}" "${DEV[@]}" --workload quick "${SHAPE[@]}" "${gen[@]}" \
        --schedules pipo,flexgen,sequential "${FLEXGEN[@]}" --out "$OUT/quick.json"
    step W1 150 90 "${BENCH[@]}" "${DEV[@]}" --workload W1 "${SHAPE[@]}" "${gen[@]}" --schedules pipo \
        "${FLEXGEN[@]}" --trace-dir "$TRACES" --out "$OUT/w1.json"
    step W2 120 80 "${BENCH[@]}" "${DEV[@]}" --workload W2 "${SHAPE[@]}" "${gen[@]}" --schedules pipo \
        "${FLEXGEN[@]}" --out "$OUT/w2.json"
    step W3 120 80 "${BENCH[@]}" "${DEV[@]}" --workload W3 "${SHAPE[@]}" "${gen[@]}" --schedules pipo \
        "${FLEXGEN[@]}" --out "$OUT/w3.json"
    step W1-other-schedules 120 60 "${BENCH[@]}" "${DEV[@]}" --workload W1 "${SHAPE[@]}" "${gen[@]}" \
        --schedules flexgen,sequential --out "$OUT/w1_schedules.json"
}

spec() {
    local dry=()
    [ "$DRY_RUN" = 1 ] && dry=(--dry-run)
    step spec-tests 90 30 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_speculate.py \
        -k cuda
    step spec-cost 180 90 "$PY" benchmarks/bench_spec_cost.py "${dry[@]}" --out "$OUT/spec_cost.json"
}

"$STAGE"
say "files: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
    say "done with problems: ${FAILED[*]}"
    exit 1
fi
say "done: every step passed"
