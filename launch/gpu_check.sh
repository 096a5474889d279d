#!/usr/bin/env bash
# One short GPU check (run on the lent machine with carry [".whl"]; see launch/gpu_wheels.sh):
# install the carried wheels, run the tiny GAL loop on the GPU, then the SD 1.5-sized benchmarks.
# Writes logs and bench JSON under $OUT (or ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GAL_JAX_CACHE=/tmp/gal_cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, diffusers, transformers; print(jax.devices(), diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
gal() { python3 -m gal_jax.main "$@"; }
gal run --config=configs/tiny_cpu.py --workdir=/tmp/gal_tiny 2>&1 | tail -8 | tee "$OUT/tiny_run.txt"
for target in sample train score; do
  gal bench "$target" --config=configs/sd15_object.py --config.bench.model=sd15 \
    --config.sample.max_images_per_device=${IMAGES_PER_DEVICE:-8} --config.bench.iters=3 \
    --config.bench.out="$OUT/bench_$target.json" 2>&1 | tail -16 | tee "$OUT/bench_$target.txt"
done
