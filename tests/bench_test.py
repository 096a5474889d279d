"""`gal-jax bench load`: weights read straight onto an fsdp mesh with no host copy of the model."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from gal_jax import bench, models, sharding
from gal_jax.nn import unet as nn_unet
from gal_jax.nn import weights

# SD 1.5's layout at a fifth of its width: ~35M params, big enough for memory figures to mean something.
MID_UNET = dict(models.SD15_UNET, block_out_channels=(64, 128, 256, 256), cross_attention_dim=256)


@pytest.fixture(scope="module")
def mid_unet(tmp_path_factory):
    return bench.write_random_unet(tmp_path_factory.mktemp("mid") / "unet", MID_UNET, seed=3)


def test_load_onto_fsdp_adds_no_host_copy_of_the_model(mid_unet):
    if not bench.reset_peak_host_memory():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    figures = bench.load_figures(mid_unet, sharding.make_mesh(1, 8), "float32")
    assert figures["params"] > 30_000_000 and figures["devices"] == 8
    assert figures["device_resident_mib"] >= figures["weights_mib"] * 0.99
    # On CPU the devices' shards are host memory; beyond them loading may hold about one tensor
    # at a time. A memory-mapped reader (every page it touches stays resident) or reading the
    # whole file first would add a second copy of the model, ~weights_mib.
    assert figures["host_overhead_mib"] < 0.25 * figures["weights_mib"], figures


def test_streamed_random_weights_are_a_diffusers_unet_folder(mid_unet):
    """The benchmark's writer produces what the safetensors package reads, in torch layouts, and
    our loader puts each value where the unsharded read has it."""
    stored = safetensors.numpy.load_file(str(mid_unet / weights.DIFFUSERS_WEIGHTS_STEM) + ".safetensors")
    model = nn_unet.UNet2DConditionModel(nn_unet.read_config(mid_unet / "config.json"))
    abstract = traverse_util.flatten_dict(nn_unet.abstract_params(model))
    assert sorted(stored) == sorted(weights.diffusers_key(path) for path in abstract)
    conv = stored["down_blocks.1.resnets.0.conv1.weight"]
    assert conv.shape == (128, 64, 3, 3) and 0.015 < conv.std() < 0.025
    placed = nn_unet.load_params(model, mid_unet, shardings=sharding.param_shardings(
        nn_unet.abstract_params(model), sharding.make_mesh(1, 8), nn_unet.logical_partition_specs(model)))
    kernel = traverse_util.flatten_dict(placed)[("down_blocks_1", "resnets_0", "conv1", "kernel")]
    assert "fsdp" in kernel.sharding.spec
    np.testing.assert_array_equal(np.asarray(kernel), conv.transpose(2, 3, 1, 0))


def test_bench_load_command_prints_and_writes_its_figures(tmp_path, tiny_models):
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, "-m", "gal_jax.main", "bench", "load", "--config=configs/tiny_cpu.py",
         f"--config.model.sd_path={tiny_models['sd']}", "--config.mesh.data=2", "--config.mesh.fsdp=4",
         f"--config.bench.out={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["benchmark"] == "load" and figures["devices"] == 8 and figures["params"] > 0
    assert "load_s" in result.stdout and "host_overhead_mib" in result.stdout


def test_records_append_to_a_markdown_file_with_device_versions_and_command(tmp_path):
    record = tmp_path / "BENCHMARKS.md"
    first = {"benchmark": "load", "device": "8 x cpu", "load_s": 0.5}
    bench.append_record(record, "load", first)
    bench.append_record(record, "sample", {"benchmark": "sample", "tflop_per_step": 0.2063})
    text = record.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count("### bench ") == 2 and "### bench load: " in text and "8 x cpu" in text
    assert f"jax {jax.__version__}" in text and "- command: `gal-jax" in text
    assert "| load_s | 0.5 |" in text and "| tflop_per_step | 0.2063 |" in text
