#!/usr/bin/env bash
# Every GPU figure in README, from one invocation (about 9 minutes on one H200):
#   1. bench_peers.py --device gpu: Bi-Real-18 224², batch 256, this library against the same
#      network in PyTorch on the same GPU, float32 then bfloat16;
#   2. fm_sweep.py: the Fashion-MNIST recipes, five at a time on the GPU.
# Results (text, logs, sweep JSONs and metrics) go to OUT_DIR/results.tgz; the width-32 clip twin
# workdir to OUT_DIR/twin32.tar.part-* (so a CPU machine can run the two-step recipe from it).
#
#   bash experiments/gpu_checks.sh [FMNIST_DIR] [OUT_DIR]
# Knobs for a quick dry run on a CPU machine (the same code paths, tiny sizes):
#   PYTHON=.venv/bin/python DEVICE=cpu BENCH_ARGS="--image-size 32 --batch-size 4" \
#     RECIPES=tiny_twin,tiny_kd TWIN=tiny_twin bash experiments/gpu_checks.sh
set -u
DATA=${1:-/usr/share/datasets/fashion-mnist}
OUT=${2:-runs/gpu_checks}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-gpu}
BENCH_ARGS=${BENCH_ARGS:---batch-size 256}
RECIPES=${RECIPES:-twin32,w32_e20,w32_2step,w32_2step_kd,w32_e20_aug,w32_2step_e10,w32_e30,w16_e30,w64_e20}
TWIN=${TWIN:-twin32}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import sys, jax, flax, optax, orbax.checkpoint as o, numpy; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$WORK/machine.txt"

for dtype in float32 bfloat16; do
  timeout "${BENCH_SECONDS:-130}" "$PY" experiments/bench_peers.py --device "$DEVICE" \
    --dtype "$dtype" $BENCH_ARGS --calls 10 --repeats 5 --warmup 2 --gap 0 --log-dir "$WORK" \
    2>&1 | tee "$WORK/bench_$dtype.txt"
done

# The sweep gets what is left of BUDGET seconds (the device tool stops a command at 600 s).
timeout "${SWEEP_SECONDS:-$(( ${BUDGET:-565} - SECONDS - 25 ))}" "$PY" experiments/fm_sweep.py --data "$DATA" --out "$WORK/sweep" \
  --recipes "$RECIPES" --parallel "${PARALLEL:-5}" 2>&1 | tee "$WORK/sweep.txt"
# What a cut-off sweep finished still shows: the per-recipe JSONs, and each run's evals so far.
"$PY" experiments/fm_sweep.py --table --out "$WORK/sweep" --recipes "$RECIPES" 2>&1 | tail -15

(cd "$WORK" && tar czf - machine.txt bench_*.txt bench_peers_*.log sweep.txt sweep/*.json \
   sweep/*.log sweep/*/metrics.jsonl sweep/*/config.json 2>/dev/null) > "$OUT/results.tgz"
if [ -d "$WORK/sweep/$TWIN/checkpoints" ]; then
  tar cf - -C "$WORK/sweep" "$TWIN" | split -b 15m - "$OUT/$TWIN.tar.part-"
fi
ls -la "$OUT"
