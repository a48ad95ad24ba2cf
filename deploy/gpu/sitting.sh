#!/usr/bin/env bash
# A drafter training sitting on a lent GPU machine, in three phases (deploy/gpu/README.md).
#
#   prepare  (here)         split the default target's GGUF into PARTS parts that each fit
#                           one transfer beside the working tree (it travels with every
#                           call, at most 64 MiB in all, and the GGUF alone is 98 MB), and
#                           fetch the `gguf` wheel the machine lacks (transformers reads
#                           GGUF files through it)
#   stage K  (device, K-th) keep part K (1 .. PARTS-1) on the machine, outside the carried paths
#   train    (device, last) join the staged parts and the carried last one, check the
#                           sha256, convert the target, train
#                           for BUDGET seconds from the shipped drafter, write the drafter
#                           (bf16, + meta.json) and the log into $OUT (7 files; 8 may return)
#   check    (device, opt.) the Triton kernels' tests and timings on the GPU, into $OUT
#
# Settings come from the environment (defaults in brackets): PARTS [3] (prepare), DEVICE [cuda], BUDGET [420]
# training seconds, SEQS [128] sequences per step, BLOCKS [32] anchors per sequence,
# BLOCK [8], LAYERS [1], LR [1e-3], WARMUP [100], SEED [12], INIT [default], DISTILL [0: none;
# a in (0, 1]: dflash train --distill a], WALK_WEIGHT [0: dflash train --walk-weight w], TARGET
# [the joined GGUF], DATA [both shipped data folders], EVAL_DATA [the holdout folder; empty:
# none], EVAL_EVERY [200], KERNELS [torch], GPU_DIR [.gpu],
# STAGE_DIR [.gpu-stage], PY [python3], NO_WHEEL (prepare: skip the wheel), OUT.
set -euo pipefail
phase=${1:?usage: deploy/gpu/sitting.sh prepare|stage|train|check}
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/../.."
GPU_DIR=$(realpath -m "${GPU_DIR:-.gpu}")
STAGE_DIR=$(realpath -m "${STAGE_DIR:-.gpu-stage}")
PY=${PY:-python3}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

case "$phase" in
prepare)
    gguf=$("$PY" -c "from dflash_core.models.loader import default_gguf_path; print(default_gguf_path())")
    size=$(stat -c %s "$gguf")
    n=${PARTS:-3}
    if ! [ "$n" -ge 2 ] 2>/dev/null; then
        echo "sitting.sh: PARTS must be an integer >= 2, got '$n'" >&2
        exit 2
    fi
    chunk=$(( (size + n - 1) / n ))
    rm -rf "$GPU_DIR"/part-*
    mkdir -p "$GPU_DIR/whl"
    for k in $(seq 1 "$n"); do   # part k: bytes (k-1)*chunk .. k*chunk-1
        mkdir -p "$GPU_DIR/part-$k"
        dd if="$gguf" of="$GPU_DIR/part-$k/gguf.part" iflag=skip_bytes,count_bytes bs=1M \
            skip=$(( (k - 1) * chunk )) count="$chunk" status=none
    done
    # the last part, carried by the train call, holds the checksum of the whole
    (cd "$(dirname "$gguf")" && sha256sum "$GGUF_NAME") > "$GPU_DIR/part-$n/gguf.sha256"
    if [ -z "${NO_WHEEL:-}" ] && ! ls "$GPU_DIR"/whl/gguf-*.whl >/dev/null 2>&1; then
        ver=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
        "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$GPU_DIR/whl" "gguf==$ver"
    fi
    du -sh "$GPU_DIR"/part-* "$GPU_DIR"/whl
    ;;
stage)
    k=${2:-1}
    if [ ! -f "$GPU_DIR/part-$k/gguf.part" ]; then
        echo "sitting.sh: $GPU_DIR/part-$k/gguf.part is missing: carry .gpu/part-$k with this call" >&2
        exit 2
    fi
    mkdir -p "$STAGE_DIR"
    cp "$GPU_DIR/part-$k/gguf.part" "$STAGE_DIR/part-$k.tmp"
    mv "$STAGE_DIR/part-$k.tmp" "$STAGE_DIR/part-$k"
    echo "staged part $k: $(stat -c %s "$STAGE_DIR/part-$k") bytes in $STAGE_DIR"
    (nvidia-smi -L 2>/dev/null || true)
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    ;;
join)
    # the carried last part is the one with the checksum; parts 1 .. n-1 were staged
    last=$(ls -d "$GPU_DIR"/part-*/gguf.sha256 2>/dev/null | head -n 1)
    if [ -z "$last" ]; then
        echo "sitting.sh: no $GPU_DIR/part-N/gguf.sha256: carry the last part (.gpu/part-N) with this call" >&2
        exit 2
    fi
    lastdir=$(dirname "$last")
    n=${lastdir##*part-}
    files=()
    for k in $(seq 1 $(( n - 1 ))); do
        if [ ! -f "$STAGE_DIR/part-$k" ]; then
            echo "sitting.sh: $STAGE_DIR/part-$k is missing (the machine went back after 'stage $k'?): run stage again" >&2
            exit 3
        fi
        files+=("$STAGE_DIR/part-$k")
    done
    cat "${files[@]}" "$lastdir/gguf.part" > "$STAGE_DIR/$GGUF_NAME.tmp"
    mv "$STAGE_DIR/$GGUF_NAME.tmp" "$STAGE_DIR/$GGUF_NAME"
    sums=$(realpath "$last")
    (cd "$STAGE_DIR" && sha256sum -c "$sums")
    ;;
train)
    : "${OUT:?set OUT to the folder that receives the drafter and the log}"
    t0=$(date +%s)
    TARGET=${TARGET:-}
    if [ -z "$TARGET" ]; then
        bash "$SELF" join
        TARGET=$STAGE_DIR/$GGUF_NAME
    fi
    if ls "$GPU_DIR"/whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/dflash-site "$GPU_DIR"/whl/*.whl
        export PYTHONPATH=/tmp/dflash-site:${PYTHONPATH:-}
    fi
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
    export DFLASH_CACHE=${DFLASH_CACHE:-$STAGE_DIR/cache}
    # the target's forwards here are whole-sequence prefills of up to 512 tokens: the
    # PyTorch reference attention (tested on CPU) rather than the Triton block kernel,
    # which is built for verify blocks of a few tokens and has not yet run on a real GPU
    export DFLASH_KERNELS=${KERNELS:-torch}
    run=$STAGE_DIR/run
    # held-out tau (greedy, the engine's, replayed from one prefill per prompt) as it trains
    EVAL_DATA=${EVAL_DATA-data/holdout-sharegpt-smollm2-135m}
    mkdir -p "$OUT"
    { date -u; (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true)
      "$PY" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/env.txt"
    "$PY" -m dflash_core.training.train \
        --data ${DATA:-data/sharegpt-smollm2-135m data/sharegpt-later-smollm2-135m} --out "$run" \
        --target "$TARGET" --device "${DEVICE:-cuda}" --init "${INIT:-default}" \
        --num-layers "${LAYERS:-1}" --num-features 3 --draft-vocab 8192 --block-size "${BLOCK:-8}" \
        --blocks-per-seq "${BLOCKS:-32}" --seqs-per-step "${SEQS:-128}" --lr "${LR:-1e-3}" \
        --warmup-steps "${WARMUP:-100}" --seed "${SEED:-12}" --steps 1000000 \
        --time-budget-s "${BUDGET:-420}" --snapshot-every 1000000 --ckpt-every-s 60 --log-every 10 \
        ${EVAL_DATA:+--eval-data "$EVAL_DATA" --eval-every "${EVAL_EVERY:-200}"} --distill "${DISTILL:-0}" \
        --walk-weight "${WALK_WEIGHT:-0}" --no-progress | tee -a "$OUT/env.txt" && status=0 || status=$?
    # whatever happened, hand back what the run has: its log, and its drafter if it saved one
    cp "$run/log.jsonl" "$run/train_config.json" "$OUT/" 2>/dev/null || true
    if [ ! -f "$run/latest/model.safetensors" ] && [ ! -f "$run/best/meta.json" ]; then
        echo "sitting.sh: training failed (exit $status) before its first checkpoint" >&2
        exit "${status:-1}"
    fi
    # the drafter in bf16 (as shipped; fp32 would pass the 16 MiB a returned file may
    # have) with a snapshot's meta.json, so that the folder is also a point of the curve
    # (`dflash eval --snapshots`: put it under <run>/snapshots/step_NNNNNN/). With held-out
    # evaluation it is the run's best (`best/`), else its last step.
    "$PY" -c "
import json, sys, torch
from pathlib import Path
from dflash_core.drafter import DFlashDrafter
run, dst = Path(sys.argv[1]), Path(sys.argv[2])
src = run / 'best' if (run / 'best' / 'meta.json').exists() else run / 'latest'
DFlashDrafter.load(src).save(dst, dtype=torch.bfloat16)
meta = json.loads((src / 'meta.json').read_text())   # both folders carry one (Trainer._save_drafter)
(dst / 'meta.json').write_text(json.dumps({**meta, 'from': src.name}))
print('returned drafter:', json.dumps(meta))
" "$run" "$OUT/drafter" | tee -a "$OUT/env.txt"
    echo "wall_s $(( $(date +%s) - t0 ))" >> "$OUT/env.txt"
    ls -la "$OUT" "$OUT/drafter"
    exit "$status"
    ;;
check)
    # the GPU-only paths, when device time is left after training: the Triton kernels'
    # tests compiled for the GPU (not the interpreter) and their timings against PyTorch
    : "${OUT:?set OUT}"
    mkdir -p "$OUT"
    export PYTHONPATH=$PWD:${PYTHONPATH:-}
    set +e
    timeout "${CHECK_S:-240}" "$PY" -m pytest -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -40 > "$OUT/kernel_tests.txt"
    timeout 120 "$PY" -m dflash_core.kernels.bench --dtype bf16 2>&1 | tail -40 > "$OUT/kernel_bench.txt"
    tail -n 3 "$OUT/kernel_tests.txt" "$OUT/kernel_bench.txt"
    ;;
*)
    echo "sitting.sh: unknown phase '$phase' (prepare | stage | join | train | check)" >&2
    exit 2
    ;;
esac
