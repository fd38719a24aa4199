#!/usr/bin/env bash
# Train the paper's ConvMixer on CIFAR-10 on one accelerator with the `fast`
# recipe, export the newest epoch checkpoint, and time the 100-key wrong-key sweep
# there.  Run once on an NVIDIA H200 (2026-11-27) while `depthwise_impl='auto'`
# still picked XLA's grouped convolution on GPU: 21 s per epoch, cut by DEADLINE
# after 15 epochs (benchmarks/h200/). With the dense depthwise matrices the step
# measured 44x faster there (2.2 ms at batch 256, about 0.4 s of steps per
# epoch), so the defaults now ask for 200 epochs within 480 s; not yet tried.
# Superseded by `python benchmarks/accelerator_check.py run`, which
# trains the `strong` recipe (the committed model's) and runs the bench and the sweep
# in one budget (benchmarks/README.md); this script is kept as the record of that run.
#
# usage: bash scripts/train_on_gpu.sh [DATA.tar.xz]
#   DATA.tar.xz  the CIFAR-10 JPEG copy (class-subfolder layout) as one archive:
#                tar -C ../shared/data -cf - cifar10-jpeg | xz -6 > DATA.tar.xz
# environment: OUT (results folder, default gpu-out), EPOCHS (default 200),
#   DEADLINE (seconds of training before the run is stopped and its last epoch
#   checkpoint exported, default 480), LIMIT_TRAIN / LIMIT_TEST (dry runs only).
# Writes to OUT: env.txt, train.log, train_log.json, plain-model.tar, attack-*.json.
set -u -o pipefail
OUT=${OUT:-gpu-out}
ARCHIVE=${1:-.devcarry/cifar10-jpeg.tar.xz}
EPOCHS=${EPOCHS:-200}
DEADLINE=${DEADLINE:-480}
WORK=${WORK:-/tmp/cmj-gpu}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
# CONVMIXER_JAX_KEEP_XLA_FLAGS: the package's XLA:CPU flag is for the jaxlib pinned in
# pyproject.toml; an accelerator image may carry another jaxlib.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CONVMIXER_JAX_CACHE=$WORK/cache \
  CONVMIXER_JAX_KEEP_XLA_FLAGS=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
cj() { python3 -c 'import sys; from convmixer_jax.cli import main; sys.exit(main())' "$@"; }

{
  date -u +%FT%TZ
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import jax, jaxlib, flax, optax, orbax.checkpoint as o, numpy
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "orbax", o.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())'
} 2>&1 | tee "$OUT/env.txt" || exit 1

python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
  "$ARCHIVE" "$WORK/data" || exit 1
DATA=$WORK/data/cifar10-jpeg
echo "data extracted at $(elapsed) s"

limits=()
[ -n "${LIMIT_TRAIN:-}" ] && limits+=(--limit-train "$LIMIT_TRAIN")
[ -n "${LIMIT_TEST:-}" ] && limits+=(--limit-test "$LIMIT_TEST")
timeout "$DEADLINE" python3 -c 'import sys; from convmixer_jax.cli import main; sys.exit(main())' \
  train --data-dir "$DATA" --recipe fast --epochs "$EPOCHS" --preset paper --seed 0 \
  "${limits[@]}" --workdir "$WORK/train" --out "$WORK/model-direct" --quiet 2>&1 | tee "$OUT/train.log"
echo "training ended (status ${PIPESTATUS[0]}) at $(elapsed) s" | tee -a "$OUT/train.log"
cp "$WORK/train/train_log.json" "$OUT/train_log.json"

# Export the newest epoch checkpoint (the last one if training finished).
cj export-model --workdir "$WORK/train" --out "$WORK/plain-model" \
  --data-label "CIFAR-10 (JPEG copy), shared/data/cifar10-jpeg" || exit 1
tar -C "$WORK" -cf "$OUT/plain-model.tar" plain-model
echo "exported at $(elapsed) s"

# The wrong-key sweep on the accelerator: 100 keys x all test images, two chunkings
# (keys per call, images per call; --batch-size counts the model inputs of a call).
for spec in "4 125" "25 1000"; do
  set -- $spec
  if [ "$(elapsed)" -lt 470 ]; then
    timeout 60 python3 -c 'import sys; from convmixer_jax.cli import main; sys.exit(main())' \
      attack "$WORK/plain-model" --data-dir "$DATA" --num-keys 100 --key-seed 1 --key-chunk "$1" \
      --batch-size "$(( $1 * $2 ))" --quiet --out "$OUT/attack-chunk$1-batch$2.json" ${LIMIT_TEST:+--limit $LIMIT_TEST}
    echo "attack chunk $1 batch $2 ended (status $?) at $(elapsed) s"
  fi
done
