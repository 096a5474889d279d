#!/usr/bin/env bash
# Downloads into ./.whl the Python 3.12 wheels the lent GPU machine lacks (its image has jax 0.11,
# flax, optax, orbax, chex, torch and transformers 5.x but no diffusers and no Flax transformers).
# Then launch/gpu_check.sh runs there with `carry: [".whl"]`. Nothing here is committed (.whl is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
  diffusers==0.39.0 transformers==4.57.6 "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0" \
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 array_record==0.8.6 grain==0.2.18 \
  tensorflow-metadata googleapis-common-protos simple_parsing docstring-parser immutabledict termcolor \
  toml dm-tree more-itertools importlib_resources importlib_metadata portpicker
# promise (needed by TFDS) is published as an sdist only: build its pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
du -sh .whl && ls .whl
