"""Weighted DreamBooth training: the loss by hand, gradients against PyTorch, sharded steps, rounds."""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import tiny_cpu
from gal_jax.nn import weights as nn_weights
from gal_jax.nn import layers as nn_layers
from gal_jax import data, input_pipeline, models, schedulers, sharding, train, trainer as trainer_lib

BATCH_SIZE = 4  # instance examples a step: 8 rows with their class images, one per fake device


def tiny_config(**train_overrides):
    config = tiny_cpu.get_config()
    config.train.batch_size = BATCH_SIZE
    config.train.steps = 12
    config.train.log_every = 6
    # Adam's first update is lr * g / (|g| + eps): with the default eps 1e-8, float noise in the
    # few near-zero gradients (|g| ~ 1e-9) moves their update by up to lr between meshes.
    config.train.adam_eps = 1e-6
    config.train.update(train_overrides)
    return config


@pytest.fixture(scope="module")
def loaded(loaded_default_sd):
    return loaded_default_sd


@pytest.fixture(scope="module")
def train_set(tiny_assets, loaded, tmp_path_factory):
    sd, _ = loaded
    references = data.load_concept(tiny_assets["object_concept"])
    return data.write_training_set(
        references,
        data.list_class_images(tiny_assets["reg_dir"]),
        "a teapot",
        tmp_path_factory.mktemp("train_set") / "set",
        sd.tokenize,
        64,
    )


@pytest.fixture(scope="module")
def trainer(loaded):
    sd, _ = loaded
    return trainer_lib.Trainer(tiny_config(), sd, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def first_round(trainer, loaded, train_set):
    _, params = loaded
    result, metrics = trainer.train_round(params, train_set, progress=False)
    return result.unet, metrics


def dreambooth_frozen(params, sd, mesh):
    """Returns DreamBooth's frozen step inputs: the VAE and the text encoder (the UNet trains)."""
    return train.place_frozen(params.vae, {"text_encoder": params.text_encoder}, sd, mesh)


def synthetic_batch(sd, num_instances, seed=0, weights=None):
    """Returns a host batch of cached latent moments: instance i then its class example, i < n."""
    rng = np.random.default_rng(seed)
    rows = 2 * num_instances
    weights = np.linspace(1.0, 0.25, num_instances) if weights is None else np.asarray(weights)
    prompts = ["a <tiny-teapot> teapot on the grass", "a teapot"] * num_instances
    return {
        "latent_mean": rng.standard_normal((rows, 4, 16, 16)).astype(np.float32),
        "latent_std": (0.1 * np.abs(rng.standard_normal((rows, 4, 16, 16)))).astype(np.float32),
        "input_ids": sd.tokenize(prompts),
        "weight": np.repeat(weights, 2).astype(np.float32),
        "is_prior": np.tile([False, True], num_instances),
    }


def with_randomness(sd, batch, seed=1):
    """Returns the batch with fixed noise, timesteps and posterior draws."""
    rng = np.random.default_rng(seed)
    shape = batch["latent_mean"].shape
    return {
        **batch,
        "noise": rng.standard_normal(shape).astype(np.float32),
        "timesteps": rng.integers(0, 1000, shape[0]).astype(np.int32),
        "posterior_eps": rng.standard_normal(shape).astype(np.float32),
    }


def relative_error(tree, reference):
    """Returns |tree - reference| / |reference|, norms over all leaves together."""
    def squares(t):
        return sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(t))

    difference = jax.tree_util.tree_map(np.subtract, tree, reference)
    return np.sqrt(squares(difference) / squares(reference))


# ---------------------------------------------------------------------------------------------
# The weighted loss


def test_weighted_loss_equals_hand_computation():
    losses = jnp.array([1.0, 2.0, 3.0, 4.0])
    weights = jnp.array([1.0, 0.5, 1.0, 0.5])
    is_prior = jnp.array([False, True, False, True])
    loss, parts = train.weighted_dreambooth_loss(losses, weights, is_prior, prior_loss_weight=0.7)
    # instances: (1*1 + 1*3) / 2 = 2; class examples: (0.5*2 + 0.5*4) / 2 = 1.5
    np.testing.assert_allclose(parts["instance_loss"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(parts["prior_loss"], 1.5, rtol=1e-6)
    np.testing.assert_allclose(loss, 2.0 + 0.7 * 1.5, rtol=1e-6)


def test_weight_is_absolute_at_batch_size_one():
    is_prior = jnp.array([False, True])
    losses = jnp.array([2.0, 4.0])
    loss, _ = train.weighted_dreambooth_loss(losses, jnp.full(2, 0.003), is_prior, prior_loss_weight=1.0)
    # Dividing by sum(w) would give 2 + 4 = 6, whatever the weight.
    np.testing.assert_allclose(loss, 0.003 * 2.0 + 0.003 * 4.0, rtol=1e-6)
    zero, _ = train.weighted_dreambooth_loss(losses, jnp.zeros(2), is_prior, prior_loss_weight=1.0)
    assert float(zero) == 0.0


def test_loss_without_class_examples_is_the_weighted_instance_mean():
    loss, parts = train.weighted_dreambooth_loss(
        jnp.array([1.0, 3.0]), jnp.array([1.0, 0.5]), jnp.array([False, False]), prior_loss_weight=1.0
    )
    np.testing.assert_allclose(loss, (1.0 + 1.5) / 2, rtol=1e-6)
    assert float(parts["prior_loss"]) == 0.0


def test_loss_is_the_same_however_the_batch_is_split():
    rng = np.random.default_rng(0)
    losses = jnp.asarray(rng.uniform(0, 2, 16), jnp.float32)
    weights = jnp.asarray(rng.uniform(0, 1, 16), jnp.float32)
    is_prior = jnp.asarray(np.tile([False, True], 8))
    full, _ = train.weighted_dreambooth_loss(losses, weights, is_prior, 0.8)
    counts = train.example_counts(is_prior)
    for num_micro in (2, 4, 8):
        micro = [slice(j, None, num_micro) for j in range(num_micro)]
        parts = [
            train.weighted_dreambooth_loss(losses[m], weights[m], is_prior[m], 0.8, counts)[0]
            for m in micro
        ]
        np.testing.assert_allclose(sum(parts), full, rtol=1e-6)
    mesh = sharding.make_mesh(4, 2)
    sharded = jax.device_put((losses, weights, is_prior), sharding.batch_sharding(mesh))
    on_mesh = jax.jit(lambda *a: train.weighted_dreambooth_loss(*a, 0.8)[0])(*sharded)
    np.testing.assert_allclose(on_mesh, full, rtol=1e-6)


def test_class_examples_take_their_instance_weight(tiny_assets, loaded, tmp_path):
    sd, _ = loaded
    references = data.load_concept(tiny_assets["object_concept"])
    weights = [1.0, 0.003, 0.5, 0.0]
    references = [dataclasses.replace(r, weight=w) for r, w in zip(references, weights, strict=True)]
    class_images = data.list_class_images(tiny_assets["reg_dir"])
    train_set = data.write_training_set(
        references, class_images, "a teapot", tmp_path / "set", sd.tokenize, 64
    )
    iterator = input_pipeline.make_train_iterator(train_set, global_batch_size=4, seed=0, resolution=64)
    seen = set()
    for _ in range(5):
        batch = next(iterator)
        np.testing.assert_array_equal(batch["is_prior"], np.tile([False, True], 4))
        np.testing.assert_array_equal(batch["weight"][1::2], batch["weight"][0::2])
        seen.update(batch["weight"].tolist())
    assert seen == set(np.float32(weights).tolist())


# ---------------------------------------------------------------------------------------------
# UNet gradients


@pytest.fixture(scope="module")
def unet_grad(loaded, trainer):
    sd, params = loaded
    frozen = dreambooth_frozen(params, sd, trainer.mesh)

    @jax.jit
    def grad(batch):
        loss_fn = lambda p: train.dreambooth_loss({"unet": p}, batch, frozen, sd=sd, config=train.StepConfig())[0]
        return jax.value_and_grad(loss_fn)(params.unet)

    return grad


def test_example_weight_scales_its_unet_gradient_exactly(loaded, unet_grad):
    sd, _ = loaded
    # Batch size 1: one instance example and its class example, which inherits its weight.
    batch = with_randomness(sd, synthetic_batch(sd, 1))
    gradient = lambda w: unet_grad({**batch, "weight": np.full(2, w, np.float32)})[1]
    unit = gradient(1.0)
    # A power of two scales every float exactly; other weights up to rounding.
    chex.assert_trees_all_equal(gradient(0.25), jax.tree_util.tree_map(lambda g: 0.25 * g, unit))
    scaled = jax.tree_util.tree_map(lambda g: 0.003 * g, unit)
    assert relative_error(gradient(0.003), scaled) <= 1e-5
    assert all(not np.any(g) for g in jax.tree_util.tree_leaves(jax.device_get(gradient(0.0))))


def _torch_dreambooth_grads(sd_dir, batch):
    """Returns the PyTorch diffusers UNet's gradient of the same loss, by diffusers name."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").double()
    text_encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder").eval()
    scheduler = DDPMScheduler.from_pretrained(sd_dir / "scheduler")
    as_torch = lambda k: torch.from_numpy(np.asarray(batch[k])).double()
    latents = as_torch("latent_mean") + as_torch("latent_std") * as_torch("posterior_eps")
    timesteps = torch.from_numpy(batch["timesteps"]).long()
    noisy = scheduler.add_noise(latents, as_torch("noise"), timesteps)
    with torch.no_grad():
        context = text_encoder(torch.from_numpy(batch["input_ids"]).long())[0].double()
    prediction = unet(noisy, timesteps, context).sample
    mse = ((prediction - as_torch("noise")) ** 2).mean(dim=(1, 2, 3))
    weighted, prior = as_torch("weight") * mse, torch.from_numpy(batch["is_prior"])
    (weighted[~prior].sum() / (~prior).sum() + weighted[prior].sum() / prior.sum()).backward()
    return {name: p.grad.numpy() for name, p in unet.named_parameters()}


def test_unet_gradient_matches_pytorch_diffusers(tiny_assets, loaded, unet_grad):
    sd, params = loaded
    batch = with_randomness(sd, synthetic_batch(sd, 1, weights=[0.7]))
    loss, grads = unet_grad(batch)
    torch_grads = _torch_dreambooth_grads(tiny_assets["sd"], batch)
    flat = traverse_util.flatten_dict(jax.device_get(grads))
    reference = {path: nn_weights.from_torch_layout(path, torch_grads[nn_weights.diffusers_key(path)])
                 for path in flat}
    assert sorted(map(nn_weights.diffusers_key, flat)) == sorted(torch_grads)
    assert np.sqrt(sum(np.sum(g**2) for g in reference.values())) > 0.1
    assert relative_error(flat, reference) <= 1e-5


# ---------------------------------------------------------------------------------------------
# The sharded step


def _one_step(trainer, sd, params, host_batch):
    mesh = trainer.mesh
    state = train.init_train_state({"unet": params.unet}, trainer.optimizer, mesh, trainer.model_axes)
    frozen = dreambooth_frozen(params, sd, mesh)
    batch = sharding.global_batch_from_local(host_batch, mesh)
    rng = jax.device_put(jax.random.key(0), sharding.replicated(mesh))
    return trainer.compiled_step(state, batch, frozen)(state, batch, rng, frozen)


@pytest.mark.parametrize(
    "mesh_shape",
    [pytest.param((8, 1, 1), marks=pytest.mark.slow), (4, 2, 1), pytest.param((2, 4, 1), marks=pytest.mark.slow),
     (2, 2, 2), pytest.param((4, 1, 2), marks=pytest.mark.slow), pytest.param((1, 1, 8), marks=pytest.mark.slow)],
)
def test_train_step_on_mesh_equals_single_device(loaded, trainer, mesh_shape, monkeypatch):
    sd, params = loaded
    host_batch = synthetic_batch(sd, BATCH_SIZE)
    expected, expected_metrics = _one_step(trainer, sd, params, host_batch)
    if mesh_shape[2] > 1:  # split every attention and MLP layer of the tiny UNet, not only its largest
        monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 1)
    sharded = trainer_lib.Trainer(tiny_config(), sd, sharding.make_mesh(*mesh_shape))
    state, metrics = _one_step(sharded, sd, params, host_batch)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(expected.params), atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], expected_metrics["grad_norm"], rtol=1e-5)
    assert int(state.step) == 1
    expected_shardings = sharding.param_shardings(state.params, sharded.mesh, sd.logical_axes().unet)
    for leaf, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(expected_shardings)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    specs = {leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(state.params)}
    assert any("fsdp" in spec for spec in specs) == (mesh_shape[1] > 1)
    assert any("tensor" in spec for spec in specs) == (mesh_shape[2] > 1)
    if mesh_shape[2] > 1:
        to_q = state.params["unet"]["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
        assert to_q.sharding.spec == P("fsdp" if mesh_shape[1] > 1 else None, "tensor")


def _all_reduces(compiled) -> list[str]:
    """Returns the op_name of every all-reduce of the compiled step."""
    lines = [line for line in compiled.as_text().splitlines() if re.search(r" all-reduce(?:-start)?\(", line)]
    return [re.search(r'op_name="([^"]*)"', line).group(1) for line in lines]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_flat_all_reduce_step_equals_single_device_in_one_all_reduce(loaded, trainer, grad_accum_steps):
    # On 8 data shards each shard takes its rows (divided by the whole batch's counts) and the
    # shards' gradients and metrics are summed in one all-reduce; with accumulation each shard
    # splits its own rows into micro-batches.
    sd, params = loaded
    host_batch = synthetic_batch(sd, BATCH_SIZE)
    expected, expected_metrics = _one_step(trainer, sd, params, host_batch)
    shards = 8 // grad_accum_steps  # every micro-batch splits over the shards
    flat = trainer_lib.Trainer(tiny_config(grad_all_reduce="flat", grad_accum_steps=grad_accum_steps), sd,
                               sharding.make_mesh(shards, 1, 1, devices=jax.devices()[:shards]))
    state, metrics = _one_step(flat, sd, params, host_batch)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(expected.params), atol=1e-5, rtol=0)
    for name in ("loss", "instance_loss", "prior_loss", "grad_norm"):
        np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, err_msg=name)
    for leaf in jax.tree_util.tree_leaves(state.params):
        assert leaf.sharding.is_fully_replicated
    # The gradients and metrics in one all-reduce; besides it only the example counts' sum.
    (compiled,) = flat._compiled.values()
    assert sorted(_all_reduces(compiled)) == ["jit(train_step)/reduce_sum", "jit(train_step)/shard_map/psum"]


@pytest.mark.slow
def test_xla_all_reduce_sums_each_gradient_leaf_apart(loaded):
    # What "flat" saves XLA:CPU: the SPMD partitioner's all-reduce per gradient leaf.
    sd, params = loaded
    xla = trainer_lib.Trainer(tiny_config(grad_all_reduce="xla"), sd, sharding.make_mesh(8, 1, 1))
    _one_step(xla, sd, params, synthetic_batch(sd, BATCH_SIZE))
    (compiled,) = xla._compiled.values()
    assert len(_all_reduces(compiled)) > 10


def _layout(mesh, fsdp_sharded=False):
    spec = P("fsdp") if fsdp_sharded else P()
    return {"kernel": jax.sharding.NamedSharding(mesh, spec), "bias": sharding.replicated(mesh)}


def test_auto_takes_the_flat_all_reduce_on_cpu_where_the_layout_allows():
    step = train.StepConfig(grad_all_reduce="auto")
    data_parallel, fsdp = sharding.make_mesh(8, 1, 1), sharding.make_mesh(4, 2, 1)
    assert train.uses_flat_all_reduce(step, data_parallel, _layout(data_parallel))
    assert not train.uses_flat_all_reduce(step, sharding.make_mesh(1, 1, devices=jax.devices()[:1]),
                                          _layout(data_parallel))
    assert not train.uses_flat_all_reduce(step, fsdp, _layout(fsdp, fsdp_sharded=True))
    assert train.uses_flat_all_reduce(step, fsdp, _layout(fsdp))  # fsdp=2 left everything replicated
    assert not train.uses_flat_all_reduce(step, sharding.make_mesh(4, 1, 2), _layout(data_parallel))
    assert not train.uses_flat_all_reduce(train.StepConfig(grad_all_reduce="xla"), data_parallel,
                                          _layout(data_parallel))
    terms = (("dco", {"beta": 1.0}),)
    assert not train.uses_flat_all_reduce(dataclasses.replace(step, loss_terms=terms), data_parallel,
                                          _layout(data_parallel))


@pytest.mark.parametrize(
    "mesh_shape, fsdp_sharded, terms, message",
    [
        ((4, 2, 1), True, (), r"needs every weight replicated, and mesh.fsdp=2 shards some"),
        ((4, 1, 2), False, (), r"mesh.tensor=2 splits the weights too"),
        ((8, 1, 1), False, (("dco", {"beta": 1.0}),), r"train.loss_terms \(dco\) are computed over the whole batch"),
    ],
)
def test_flat_all_reduce_where_the_layout_forbids_it_is_rejected(mesh_shape, fsdp_sharded, terms, message):
    step = train.StepConfig(grad_all_reduce="flat", loss_terms=terms)
    mesh = sharding.make_mesh(*mesh_shape)
    with pytest.raises(ValueError, match=r"train.grad_all_reduce='flat' .*" + message):
        train.uses_flat_all_reduce(step, mesh, _layout(mesh, fsdp_sharded))


# ---------------------------------------------------------------------------------------------
# Rounds


def test_training_lowers_the_loss_on_the_tiny_concept(first_round):
    _, metrics = first_round
    # Each log window is the mean of 6 steps x 8 examples at random timesteps.
    assert [h["step"] for h in metrics["history"]] == [6, 12]
    assert metrics["history"][-1]["loss"] < 0.9 * metrics["history"][0]["loss"]
    assert metrics["loss"] == metrics["history"][-1]["loss"]
    assert metrics["samples_per_s"] > 0 and metrics["compile_seconds"] > 0


@pytest.mark.slow
def test_training_lowers_the_loss_of_a_fixed_batch(loaded, trainer, train_set, first_round):
    sd, params = loaded
    frozen = dreambooth_frozen(params, sd, trainer.mesh)
    batch = next(input_pipeline.make_train_iterator(train_set, global_batch_size=8, seed=3, resolution=64))
    batch = {**batch, **train.draw_step_randomness(jax.random.key(7), sd, batch, 1000)}
    loss = jax.jit(lambda p: train.dreambooth_loss({"unet": p}, batch, frozen, sd=sd, config=train.StepConfig())[0])
    # Host copies: both calls then see the same input layout and share one compile.
    assert float(loss(jax.device_get(first_round[0]))) < 0.9 * float(loss(jax.device_get(params.unet)))


def test_min_snr_gamma_weights_each_example_loss_by_its_timestep(loaded, trainer, train_set):
    """With train.snr_gamma every example's MSE is scaled by min(SNR, gamma) / SNR of its own
    timestep before the absolute weights: one example alone in the batch shows it exactly."""
    sd, params = loaded
    frozen = dreambooth_frozen(params, sd, trainer.mesh)
    batch = next(input_pipeline.make_train_iterator(train_set, global_batch_size=2, seed=1, resolution=64))
    batch = {**batch, **train.draw_step_randomness(jax.random.key(3), sd, batch, 1000)}
    batch = {k: v[:1] for k, v in batch.items()}  # one instance example
    batch["timesteps"] = np.array([40])  # SNR(40) is far above 5: the weight is small
    loss = jax.jit(lambda gamma: train.dreambooth_loss(
        {"unet": params.unet}, batch, frozen, sd=sd, config=train.StepConfig(snr_gamma=gamma))[0], static_argnums=0)
    weight = schedulers.min_snr_weight(frozen.noise_schedule, jnp.array([40]), 5.0, sd.prediction_type)
    assert float(weight[0]) < 0.2
    np.testing.assert_allclose(float(loss(5.0)), float(loss(0.0)) * float(weight[0]), rtol=1e-5)


def test_a_loss_mask_weighs_each_latent_pixel_and_all_ones_is_the_plain_loss(loaded, trainer):
    sd, params = loaded
    frozen = dreambooth_frozen(params, sd, trainer.mesh)
    batch = with_randomness(sd, synthetic_batch(sd, 2))
    loss = jax.jit(lambda b: train.dreambooth_loss({"unet": params.unet}, b, frozen, sd=sd, config=train.StepConfig()))
    plain, plain_parts = loss(batch)
    ones, ones_parts = loss({**batch, "loss_mask": np.ones((4, 16, 16), np.float32)})
    np.testing.assert_allclose(float(ones), float(plain), rtol=1e-6)
    # Left half weighted 1, right half 0.25 (soft_alpha 0.25 of a left-half mask): the instance
    # loss is the weighted mean of the two halves' errors, each half from a mask of its own.
    left = np.zeros((4, 16, 16), np.float32)
    left[..., :8] = 1
    only_left, parts = loss({**batch, "loss_mask": left})
    _, right_parts = loss({**batch, "loss_mask": 1 - left})
    soft, soft_parts = loss({**batch, "loss_mask": left * 0.75 + 0.25})
    for name in ("instance_loss", "prior_loss"):
        np.testing.assert_allclose(float(soft_parts[name]), float(parts[name]) + 0.25 * float(right_parts[name]),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(parts[name]) + float(right_parts[name]), float(plain_parts[name]), rtol=1e-5)


def test_rounds_restart_from_base_weights_without_recompiling(loaded, trainer, train_set, first_round):
    _, params = loaded
    base = jax.device_get(params.unet)
    again, metrics = trainer.train_round(params, train_set, progress=False)
    again = again.unet
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    compiled = trainer.compile_for(abstract, num_examples=2 * BATCH_SIZE)
    assert trainer.num_compiles == 1
    assert compiled.cost_analysis()["flops"] > 0
    # The fresh state's initializer (params copy, zero AdamW moments) is built once too.
    assert len(trainer._initializers) == 1
    # Each round starts from the base weights: the same data and seed give the same result.
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(first_round[0]))
    chex.assert_trees_all_equal(jax.device_get(params.unet), base)
    assert metrics["start_step"] == 0 and metrics["steps"] == 12


def test_non_finite_loss_raises_naming_the_step(loaded, trainer, train_set):
    _, params = loaded
    poisoned = jax.tree_util.tree_map(lambda x: x, params.unet)
    poisoned["conv_in"]["kernel"] = jnp.full_like(poisoned["conv_in"]["kernel"], jnp.nan)
    broken = dataclasses.replace(params, unet=poisoned)
    with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 1$"):
        trainer.train_round(broken, train_set, progress=False)


def test_batch_not_divisible_by_the_data_axes_is_rejected(loaded, train_set):
    sd, params = loaded
    trainer = trainer_lib.Trainer(tiny_config(batch_size=3), sd, sharding.make_mesh(4, 1, devices=jax.devices()[:4]))
    with pytest.raises(ValueError, match=r"a micro-batch of 6 examples \(train.batch_size=3, 2 per instance\) does not split over the 4 batch shards"):
        trainer.train_round(params, train_set, progress=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("grad_accum_steps", 0, "train.grad_accum_steps must be a positive integer"),
        ("lr_schedule", "linear", "train.lr_schedule 'linear' is not one of"),
        ("warmup_steps", 50, r"train.warmup_steps=50 must lie in \[0, train.steps=12\]"),
        ("prior_loss_weight", -1.0, "train.prior_loss_weight must be >= 0"),
        ("snr_gamma", -5.0, "train.snr_gamma must be >= 0"),
        ("grad_all_reduce", "ring", r"train.grad_all_reduce='ring': expected one of auto, xla, flat"),
    ],
)
def test_bad_train_config_is_rejected(loaded, field, value, message):
    sd, _ = loaded
    with pytest.raises(ValueError, match=message):
        trainer_lib.Trainer(tiny_config(**{field: value}), sd, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))


def test_learning_rate_warms_up_then_follows_its_schedule():
    constant = train.learning_rate_schedule(tiny_config(warmup_steps=4, learning_rate=1e-4).train)
    np.testing.assert_allclose([constant(0), constant(2), constant(4), constant(11)], [0, 5e-5, 1e-4, 1e-4], rtol=1e-6)
    cosine = train.learning_rate_schedule(tiny_config(lr_schedule="cosine", learning_rate=1e-4).train)
    np.testing.assert_allclose([cosine(0), cosine(6), cosine(12)], [1e-4, 5e-5, 0.0], rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Options (each compiles another step: slow)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(loaded, trainer):
    sd, params = loaded
    host_batch = synthetic_batch(sd, BATCH_SIZE)
    expected, _ = _one_step(trainer, sd, params, host_batch)
    accumulating = trainer_lib.Trainer(tiny_config(grad_accum_steps=2), sd, trainer.mesh)
    state, _ = _one_step(accumulating, sd, params, host_batch)
    chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(expected.params), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_remat_gives_the_same_gradients(loaded, trainer, unet_grad):
    sd, params = loaded
    batch = with_randomness(sd, synthetic_batch(sd, 1))
    frozen = dreambooth_frozen(params, sd, trainer.mesh)
    config = train.StepConfig.from_config(tiny_config(remat="block").train)
    assert config.remat == "block" and nn_layers.remat_policy(True) == "block" and nn_layers.remat_policy("False") == "none"
    with pytest.raises(ValueError, match="train.remat='blocks': expected one of none, block, dots_saveable"):
        train.StepConfig.from_config(tiny_config(remat="blocks").train)
    grad = jax.jit(jax.grad(lambda p: train.dreambooth_loss({"unet": p}, batch, frozen, sd=sd, config=config)[0]))
    # The tiny UNet has 8 resnet and 4 transformer blocks, each rematerialised on its own.
    assert len(re.findall(r"\bremat2?\[", str(jax.make_jaxpr(grad)(params.unet)))) == 12
    chex.assert_trees_all_close(grad(params.unet), unet_grad(batch)[1], atol=1e-6, rtol=1e-5)


def test_later_rounds_encode_only_the_images_they_add(tiny_assets, loaded, train_set, tmp_path):
    """The class images and earlier references are encoded in a run's first round only."""
    sd, _ = loaded
    encoded = []

    def encode(pixels):  # a stand-in encoder that records what it was given
        encoded.extend(_image_keys(pixels))
        return pixels[:, :2, :2].copy(), pixels[:, 2:4, 2:4].copy()

    known = {}
    first = trainer_lib.build_latent_cache(train_set, encode, resolution=64, chunk_size=8, known=known)
    assert len(encoded) >= 24 and len(set(encoded)) == len(first.rows) == 4 + 20
    references = data.load_concept(tiny_assets["object_concept"])
    queried = tmp_path / "queried.png"
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(queried)
    second_set = data.write_training_set(
        [*references, dataclasses.replace(references[0], image=queried)],
        data.list_class_images(tiny_assets["reg_dir"]), "a teapot", tmp_path / "round2", sd.tokenize, 64)
    encoded.clear()
    second = trainer_lib.build_latent_cache(second_set, encode, resolution=64, chunk_size=8, known=known)
    assert len(set(encoded)) == 1 and len(second.rows) == 25  # only the queried image is new
    fresh = trainer_lib.build_latent_cache(second_set, encode, resolution=64, chunk_size=8)
    for key, row in fresh.rows.items():
        np.testing.assert_array_equal(second.mean[second.rows[key]], fresh.mean[row])
        np.testing.assert_array_equal(second.std[second.rows[key]], fresh.std[row])


def _image_keys(pixels):
    return [trainer_lib._image_key(p) for p in pixels]


@pytest.mark.slow
def test_cached_latents_give_the_loss_of_encoding_the_pixels(loaded, trainer, train_set):
    sd, params = loaded
    frozen = dreambooth_frozen(params, sd, trainer.mesh)
    encode = jax.jit(lambda px: sd.encode_posterior(params.vae, px))
    cache = trainer_lib.build_latent_cache(train_set, lambda px: jax.device_get(encode(px)), resolution=64, chunk_size=8)
    assert len(cache.rows) == 4 + 20  # every distinct reference and class image, once
    batch = next(input_pipeline.make_train_iterator(train_set, global_batch_size=4, seed=0, resolution=64))
    batch = {**batch, **train.draw_step_randomness(jax.random.key(0), sd, batch, 1000)}
    loss = jax.jit(lambda b: train.dreambooth_loss({"unet": params.unet}, b, frozen, sd=sd, config=train.StepConfig())[0])
    cached = cache.replace_pixels(batch)
    assert "pixel_values" not in cached and cached["latent_mean"].shape == (8, 4, 16, 16)
    np.testing.assert_allclose(loss(cached), loss(batch), rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_trains_float32_weights(tiny_assets, train_set):
    sd, params = models.load_stable_diffusion(tiny_assets["sd"], compute_dtype="bfloat16")
    trainer = trainer_lib.Trainer(tiny_config(), sd, sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    trained, metrics = trainer.train_round(params, train_set, progress=False)
    trained = trained.unet
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(trained)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(metrics["loss"]) and metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]


def test_the_metric_log_clocks_start_after_the_compile_not_at_the_bar():
    """The train bar is made before the step compiles; start() (called once it has) keeps the
    compile out of the bar's rate and out of the first window's samples_per_s."""
    import time

    metrics = {"loss": jnp.float32(0.5)}
    for started in (False, True):
        log = trainer_lib._MetricLog(total=10, start=0, examples_per_step=4, progress=True, desc="test")
        with log:
            time.sleep(0.3)  # the compile
            if started:
                log.start()
            log.add(1, metrics)
            log.add(2, metrics)
            log.pull()
            elapsed = log._bar.format_dict["elapsed"]
        rate = log.history[-1]["samples_per_s"]
        if started:
            assert rate > 2 * 4 / 0.2 and elapsed < 0.2, (rate, elapsed)
        else:
            assert rate < 2 * 4 / 0.3 and elapsed >= 0.3, (rate, elapsed)
