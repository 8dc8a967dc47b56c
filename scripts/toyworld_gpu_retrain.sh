#!/usr/bin/env bash
# Issue 11's model-side retrain in ONE device call (an H200, about 8 minutes): two diffusion runs side by side on
# fresh data, then `evaluate --fidelity` of each (guidance table + plain words, the toy profile's sampler).
#
#   G: the shipped UNet + text encoder, continued (same architecture), batch 1024, lr 3e-4
#   H: a fresh UNet twice as wide with two layers per block (channels 64/128), batch 1024, lr 1e-3
#
# Here, once: the device reaches no package registry and has torch and transformers but not diffusers:
#   python -m pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata
# Device call (the `run` tool): command "bash scripts/toyworld_gpu_retrain.sh", carry [".whl"], timeout_s 600.
# What comes back in $OUT (the device returns at most 8 files of 16 MiB, two folders deep):
#   G.tar, H.tar.part-00, H.tar.part-01, ...: each run folder (pipeline/, train_config.json, train_log.json,
#   train.log, fidelity.json); fidelity.md: both runs' tables. Unpack and decompose on the CPU:
#     mkdir -p runs && tar -xf G.tar -C runs && cat H.tar.part-* | tar -xf - -C runs
#     ln -s ../../conceptor_nb/data/toyworld/clip runs/G/clip    # the run's CLIP: the shipped one
#     python -m conceptor_nb.toyworld.evaluate --decompose --model runs/G --seeds 0,1,2 --out runs/G/report.json
# Smoke run on a CPU (a minute; tiny sizes, nothing learned): SMOKE=1 OUT=/tmp/smoke bash scripts/toyworld_gpu_retrain.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/toyworld_runs}
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import diffusers" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-index .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ -n "${SMOKE:-}" ]; then
    DEV=cpu; SIZE="--n-images 64 --batch 4 --steps 2 --threads 1"; CHECK="--guidance-n 1 --word-n 1"
else
    DEV=cuda; SIZE="--n-images 100000 --batch 1024 --steps 1000000 --unet-minutes ${MINUTES:-5} --threads 6"
    CHECK="--guidance-n 128 --word-n 32"
fi
COMMON="--mode diffusion --init-from conceptor_nb/data/toyworld/pipeline --device $DEV $SIZE --warmup 100 --ema 0.9995
        --concept-share 0.5 --vocab-norm 0.5"
# shellcheck disable=SC2086
"$PY" -m conceptor_nb.toyworld.train $COMMON --resume --out "$WORK/G" --seed 61 --lr 3e-4 >"$WORK/G.log" 2>&1 &
g=$!
# shellcheck disable=SC2086
"$PY" -m conceptor_nb.toyworld.train $COMMON --out "$WORK/H" --seed 62 --lr 1e-3 --unet-channels 64 128 --unet-layers 2 \
    >"$WORK/H.log" 2>&1 &
h=$!
status=0
wait $g || status=1
wait $h || status=1
tail -n 3 "$WORK/G.log" "$WORK/H.log"
[ "$status" = 0 ] || { cp "$WORK"/*.log "$OUT"/; echo "a training run failed: logs in $OUT"; exit 1; }

: >"$OUT/fidelity.md"
for run in G H; do
    # shellcheck disable=SC2086
    "$PY" -m conceptor_nb.toyworld.evaluate --fidelity --model "$WORK/$run" --device "$DEV" --guidances 1,1.5 $CHECK \
        --out "$WORK/$run/fidelity.json" >"$WORK/$run.fidelity.log" 2>&1 || { cp "$WORK/$run.fidelity.log" "$OUT"/; exit 1; }
    { echo "## run $run"; grep -v "^guidance\|Warn" "$WORK/$run.fidelity.log"; echo; } >>"$OUT/fidelity.md"
    cp "$WORK/$run.log" "$WORK/$run/train.log"
    # one file per run, split below the device's 16 MiB per file
    tar -C "$WORK" -cf - "$run" | split -b 15m -d - "$OUT/$run.tar.part-"
done
for run in G H; do  # a run that fits in one part comes back as RUN.tar
    parts=("$OUT/$run".tar.part-*)
    [ "${#parts[@]}" = 1 ] && mv "${parts[0]}" "$OUT/$run.tar"
done
ls -la "$OUT"
cat "$OUT/fidelity.md"
