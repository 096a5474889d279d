#!/usr/bin/env bash
# One short GPU check (run on the lent machine with carry [".whl"]; see launch/gpu_wheels.sh):
# install the carried wheels, record versions, run the tiny GAL loop and the transfer-guard tests on
# the GPU, then the SD 1.5-sized benchmarks.
#
# Each step runs under its own time limit (T_<STEP> seconds, defaults below: 470 s in all, inside
# an 8-minute call), writes its whole log to $OUT/<step>.log and prints only the log's tail; a
# failed or killed step does not stop the next. $OUT/summary.txt gets "<step> rc=.. seconds=.."
# per step, $OUT/versions.txt the versions and the GPU. That is 8 files: all the device tool
# brings back, so add none. Dry run elsewhere: PY=.venv/bin/python TEST_PLATFORMS=cpu T_...=5.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; : > "$OUT/summary.txt"
PY=${PY:-python3}
WORK=${WORK:-/tmp/gal_check}; rm -rf "$WORK"; mkdir -p "$WORK"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GAL_JAX_CACHE=${GAL_JAX_CACHE:-/tmp/gal_cache}
# TFDS's tensorflow-metadata wants protobuf >= 6.31; the image's protobuf may be older.
export TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK=true

# step NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds, logging to $OUT/NAME.log.
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n "${TAIL_LINES:-10}" "$OUT/$name.log"
  [[ -z $(tail -c 1 "$OUT/$name.log") ]] || echo  # a killed step's log may end mid-line
  local note=""; if ((rc == 124 || rc == 137)); then note=" (killed at the limit)"; fi
  echo "$name rc=$rc seconds=$((SECONDS - start))$note" | tee -a "$OUT/summary.txt"
}

export PY VERSIONS='
import importlib.metadata as metadata
for name in ("protobuf", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax",
             "optax", "orbax-checkpoint", "chex", "transformers", "diffusers", "huggingface-hub",
             "torch", "tensorflow-datasets", "tensorflow-metadata", "grain", "array-record", "numpy",
             "pytest"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: not installed")
import google.protobuf, transformers, jax  # the copies that import first on PYTHONPATH
print("imported: protobuf", google.protobuf.__version__, "transformers", transformers.__version__)
print(jax.devices())
'

step install "${T_INSTALL:-45}" "$PY" -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
step versions "${T_VERSIONS:-20}" bash -c 'nvidia-smi || echo "no nvidia-smi"; "$PY" -c "$VERSIONS"'
mv "$OUT/versions.log" "$OUT/versions.txt"

# A fresh workdir: a resumed run would skip the training and checkpoints this checks.
step tiny_run "${T_TINY:-110}" "$PY" -m gal_jax.main run --config=configs/tiny_cpu.py \
  --workdir="$WORK/tiny"

# The train loop's transfer guard on a real device (CPU arrays are guarded only by conftest's
# imitation): the guard tests and the rounds that train and save under it. Full float32 matmuls
# (no TF32), so the tests' CPU tolerances hold. In one process (pytest.ini's `-n auto` cleared: the
# image may lack pytest-xdist, and workers would share the one GPU).
GUARD_TESTS="(transfer_guard and not sharded) or tiny_concept or restart or non_finite"
GUARD_TESTS+=" or killed or finished or different_run or cudnn"
if "$PY" -c "import pytest" 2>/dev/null; then
  step guard_tests "${T_GUARD_TESTS:-100}" env JAX_PLATFORMS="${TEST_PLATFORMS:-cuda}" \
    JAX_DEFAULT_MATMUL_PRECISION=highest JAX_COMPILATION_CACHE_DIR="$GAL_JAX_CACHE/xla" \
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 "$PY" -m pytest -x -q -k "$GUARD_TESTS" \
    -o addopts= -p no:cacheprovider -m "not slow" \
    tests/transfer_guard_test.py tests/checkpoint_test.py tests/train_test.py tests/nn_layers_test.py
else
  echo "guard_tests skipped: no pytest" | tee -a "$OUT/summary.txt"
fi

declare -A BENCH_LIMIT=([sample]=${T_SAMPLE:-75} [train]=${T_TRAIN:-75} [score]=${T_SCORE:-45})
for target in sample train score; do
  step "bench_$target" "${BENCH_LIMIT[$target]}" "$PY" -m gal_jax.main bench "$target" \
    --config=configs/sd15_object.py --config.bench.model=sd15 \
    --config.sample.max_images_per_device="${IMAGES_PER_DEVICE:-8}" --config.bench.iters=3 \
    --config.bench.out="$WORK/bench_$target.json"
done
cat "$OUT/summary.txt"
