"""`gal-jax bench memory`: one device's memory need from XLA's buffer assignment, nothing allocated."""

import jax
import numpy as np
import pytest

from configs import sd15_object, tiny_cpu
from gal_jax import bench, memory, sharding
from gal_jax.trainer import Trainer


def tiny_config(tiny_models):
    config = tiny_cpu.get_config()
    config.model.sd_path = str(tiny_models["sd"])
    config.train.batch_size = 4  # 8 rows with the class images: divisible over 4 devices
    return config


def nbytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def test_fsdp_shards_the_train_state_and_the_step_reuses_its_donated_buffers(tiny_models):
    config = tiny_config(tiny_models)
    sd, params = bench.abstract_stable_diffusion(config)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(params))
    state = 3 * nbytes(params.unet)  # params and AdamW's two moments

    def need(fsdp):
        mesh = sharding.make_mesh(1, fsdp, devices=jax.devices()[:fsdp])
        return memory.of_compiled(Trainer(config, sd, mesh).compile_for(params, 8))

    one, four = need(1), need(4)
    assert one.arguments >= state and one.aliased >= state, one  # the new state is written in place
    # A quarter of the state per device (a few small tensors do not divide by 4 and stay whole).
    assert one.arguments - four.arguments >= 0.6 * state, (one, four)
    assert one.peak == one.arguments + one.outputs - one.aliased + one.temporaries + one.code


def test_bench_memory_gives_the_train_step_and_a_chunk_against_the_budget(tiny_models):
    config = tiny_config(tiny_models)
    config.bench.memory_budget_gib = 1e-4
    figures = bench.bench_memory(config, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    assert figures["train_examples"] == 8 and figures["sample_images_per_chunk"] == 48
    assert figures["train.peak_gib"] > figures["train.arguments_gib"] > 0
    assert figures["sample.peak_gib"] > 0
    assert figures["fits"].startswith("no: train ") and "sample" in figures["fits"]


def test_fits_names_what_is_over_the_budget():
    small, large = memory.DeviceMemory(2**30, 0, 0, 0, 0), memory.DeviceMemory(3 * 2**30, 2**30, 0, 0, 0)
    assert memory.fits(2, train=small, sample=small) == "yes"
    assert memory.fits(2, train=small, sample=large) == "no: sample 4.00 GiB > 2 GiB"


def test_linear_need_leaves_out_the_resident_weights_and_counts_per_item_arguments():
    weights, fixed_temporaries, code = 100, 50, 7
    per_item = {"arguments": 10, "outputs": 5, "temporaries": 30}

    def compiled(items):
        return memory.DeviceMemory(weights + items * per_item["arguments"], items * per_item["outputs"], 0,
                                   fixed_temporaries + items * per_item["temporaries"], code)

    need = memory.linear_need(compiled(2), compiled(4), items=(2, 4))
    assert need == memory.LinearNeed(fixed=fixed_temporaries + code, per_item=sum(per_item.values()))
    assert need.most_items(need.fixed + 3 * need.per_item + need.per_item - 1) == 3
    assert need.most_items(need.fixed - 1) == 0
    with pytest.raises(ValueError, match="must grow"):
        memory.linear_need(compiled(4), compiled(2), items=(4, 2))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, batch_size, budget_gib", [
    (1, 1, 24),  # one 24 GiB GPU: batch 1 + 1 class image
    (4, 2, 16),  # 16 GiB TPU chips, fsdp over 4: 2 + 2 class images, one row a chip
])
def test_sd15_dreambooth_fits_its_budget(fsdp, batch_size, budget_gib):
    """configs/sd15_object.py (bf16 compute, fp32 master weights and AdamW) at SD 1.5's size:
    the train step and a generation chunk of 8 images a device, XLA:CPU's buffer assignment."""
    config = sd15_object.get_config()
    config.bench.model, config.bench.memory_budget_gib = "sd15", budget_gib
    config.train.batch_size = batch_size
    figures = bench.bench_memory(config, sharding.make_mesh(1, fsdp, devices=jax.devices()[:fsdp]))
    assert figures["fits"] == "yes", figures
