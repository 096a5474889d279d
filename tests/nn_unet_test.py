"""Our Flax UNet2DConditionModel (gal_jax.nn.unet) against diffusers' PyTorch UNet on tiny random
SD 1.x, SD 2.x and SDXL configs: outputs, gradients, the attention-capture and param-path hooks,
remat, loading (single, sharded, fp16 variant, onto an fsdp mesh) and saving."""

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Callable

import chex
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.models.attention_processor import AttnProcessor
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gal_jax.nn import unet, weights

import parity  # tests/parity.py

TOLERANCE = 1e-4  # relative to the reference's largest magnitude, float32
TEXT_WIDTH, TEXT_TOKENS, SDXL_POOLED_WIDTH, SDXL_TIME_WIDTH = 32, 7, 24, 8
_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             cross_attention_dim=TEXT_WIDTH)
CONFIGS = {
    # SD 1.x: conv projections, one head count for every level.
    "sd1": dict(_TINY, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2.x: linear projections, head counts per level, upcast attention; resnets per level too.
    "sd2": dict(_TINY, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
                layers_per_block=(1, 2), down_block_types=("CrossAttnDownBlock2D",) * 2,
                up_block_types=("CrossAttnUpBlock2D",) * 2),
    # SD 1.x with every other option this port reads set away from its default.
    "sd1_options": dict(_TINY, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), center_input_sample=True,
                        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=0.5,
                        norm_eps=1e-6, time_embedding_dim=96, conv_in_kernel=5, conv_out_kernel=1),
    # SDXL: transformer depth per level, the text_time added embedding.
    "sdxl": dict(_TINY, attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
                 addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_WIDTH,
                 projection_class_embeddings_input_dim=SDXL_POOLED_WIDTH + 6 * SDXL_TIME_WIDTH,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}


_assert_parity = functools.partial(parity.assert_parity, tolerance=TOLERANCE)


def _torch_unet(name: str) -> diffusers.UNet2DConditionModel:
    """Returns a tiny random diffusers UNet whose every param (norms included) is perturbed."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _inputs(name: str, batch: int = 2) -> dict[str, np.ndarray | dict]:
    """Returns the UNet's inputs: latents, timesteps, text context and SDXL's added conditions."""
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((batch, 4, 16, 16)).astype(np.float32),
        "timesteps": np.array([3, 500, 999][:batch]),
        "context": rng.standard_normal((batch, TEXT_TOKENS, TEXT_WIDTH)).astype(np.float32),
        "added": None,
    }
    if name == "sdxl":
        inputs["added"] = {
            "text_embeds": rng.standard_normal((batch, SDXL_POOLED_WIDTH)).astype(np.float32),
            "time_ids": rng.uniform(0, 1024, (batch, 6)).round().astype(np.float32),
        }
    return inputs


def _torch_output(torch_model, inputs, sample=None):
    added = inputs["added"] and {k: torch.from_numpy(v) for k, v in inputs["added"].items()}
    sample = torch.from_numpy(inputs["sample"]) if sample is None else sample
    return torch_model(
        sample, torch.from_numpy(inputs["timesteps"]), torch.from_numpy(inputs["context"]), added_cond_kwargs=added
    ).sample


def _forward(model: unet.UNet2DConditionModel, **apply_kwargs):
    """Returns a jitted (params, inputs) -> output of `model`."""

    def forward(params, inputs):
        return model.apply(
            {"params": params}, inputs["sample"], inputs["timesteps"], inputs["context"], inputs["added"],
            **apply_kwargs,
        )

    return jax.jit(forward)


@dataclasses.dataclass(frozen=True)
class TinyUNet:
    """A tiny random diffusers UNet saved with save_pretrained, and ours loaded from it."""

    folder: Path
    torch_model: diffusers.UNet2DConditionModel
    model: unet.UNet2DConditionModel
    params: dict
    forward: Callable  # jitted (params, inputs) -> output, compiled once per config


@pytest.fixture(scope="module")
def tiny_unets(tmp_path_factory) -> Callable[[str], TinyUNet]:
    """Returns name -> TinyUNet, each built once per module so that tests share its compiled forward."""

    @functools.cache
    def build(name: str) -> TinyUNet:
        torch_model = _torch_unet(name)
        folder = tmp_path_factory.mktemp(name)
        torch_model.save_pretrained(folder, safe_serialization=True)
        model, params = unet.load(folder)
        return TinyUNet(folder, torch_model, model, params, _forward(model))

    return build


@pytest.fixture(scope="module")
def sd1(tiny_unets) -> TinyUNet:
    return tiny_unets("sd1")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(tiny_unets, name):
    tiny, inputs = tiny_unets(name), _inputs(name)
    with torch.no_grad():
        expected = _torch_output(tiny.torch_model, inputs)
    _assert_parity(tiny.forward(tiny.params, inputs), expected, f"unet {name}")


def _recorded_torch_attention(torch_model, layer: str) -> list:
    """Returns the list into which `layer`'s attention probabilities (B * heads, T, S) go on
    each torch forward (the plain processor computes them explicitly)."""
    module = torch_model.get_submodule(layer)
    module.set_processor(AttnProcessor())
    recorded, scores = [], module.get_attention_scores

    def recording(*args, **kwargs):
        recorded.append(scores(*args, **kwargs))
        return recorded[-1]

    module.get_attention_scores = recording
    return recorded


@pytest.mark.parametrize("remat", ["none", "block", "dots_saveable"])
def test_gradients_and_captured_attention_match_torch_under_every_remat_policy(sd1, remat):
    model, inputs = unet.load(sd1.folder, remat=remat)[0], _inputs("sd1")
    target = np.random.default_rng(5).standard_normal(inputs["sample"].shape).astype(np.float32)
    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"

    def loss(params, sample):
        out, state = model.apply(
            {"params": params}, sample, inputs["timesteps"], inputs["context"],
            capture_attention=[layer], mutable=["intermediates"],
        )
        return jnp.mean(jnp.square(out - target)), unet.captured_attention(state)[layer]

    (param_grads, sample_grad), probs = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        sd1.params, inputs["sample"]
    )
    jaxpr = str(jax.make_jaxpr(loss)(sd1.params, inputs["sample"]))
    checkpoints = len(re.findall(r"\b(?:remat2|checkpoint)\[", jaxpr))  # the primitive's name varies by jax version
    assert checkpoints == (0 if remat == "none" else 12)  # sd1's 8 resnets and 4 transformers
    policies = set(re.findall(r"policy=(\w+)", jaxpr))
    assert policies == {"none": set(), "block": {"None"}}.get(remat, policies - {"None"} or {"missing"})
    torch_model = sd1.torch_model
    recorded = _recorded_torch_attention(torch_model, layer)
    torch_sample = torch.from_numpy(inputs["sample"]).requires_grad_(True)
    torch_model.zero_grad()
    torch_loss = torch.mean(torch.square(_torch_output(torch_model, inputs, torch_sample) - torch.from_numpy(target)))
    torch_loss.backward()
    _assert_parity(sample_grad, torch_sample.grad, f"sd1 grad wrt sample, remat {remat}")
    flat_grads, torch_params = traverse_util.flatten_dict(param_grads), dict(torch_model.named_parameters())
    for path in [("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel"),
                 ("conv_in", "kernel")]:
        ours = weights.to_torch_layout(path, np.asarray(flat_grads[path]))
        _assert_parity(ours, torch_params[weights.diffusers_key(path)].grad, f"sd1 grad wrt {'/'.join(path)}, remat {remat}")
    _assert_parity(probs, recorded[0].detach().reshape(2, 2, 16 * 16, TEXT_TOKENS), f"sd1 attention probs {layer}")


def test_attention_capture_leaves_outputs_bit_identical(tiny_unets):
    tiny, inputs = tiny_unets("sdxl"), _inputs("sdxl")
    names = unet.cross_attention_layers(tiny.model.config)
    assert names == (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.1.attn2",
        *(f"up_blocks.0.attentions.{i}.transformer_blocks.{j}.attn2" for i in range(2) for j in range(2)),
    )
    captured, state = _forward(tiny.model, capture_attention=True, mutable=["intermediates"])(tiny.params, inputs)
    np.testing.assert_array_equal(np.asarray(captured), np.asarray(tiny.forward(tiny.params, inputs)))
    maps = unet.captured_attention(state)
    assert set(maps) == set(names)
    for probs in maps.values():  # every cross-attention sits at the 8 x 8, 4-head level
        assert probs.shape == (2, 4, 8 * 8, TEXT_TOKENS) and probs.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"no cross-attention layer named 'mid_block\.attentions\.0\.attn2'"):
        _forward(tiny.model, capture_attention={"mid_block.attentions.0.attn2"})(tiny.params, inputs)


def test_init_params_fill_the_abstract_tree():
    model = unet.UNet2DConditionModel(unet.UNetConfig.from_dict(CONFIGS["sd1"]))
    params = unet.init_params(model, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, unet.abstract_params(model))
    flat = traverse_util.flatten_dict(params)
    conv1 = flat[("down_blocks_1", "resnets_0", "conv1", "kernel")]  # (3, 3, 32, 64), fan-in 288
    assert 0.5 < float(jnp.std(conv1)) * 288**0.5 < 1.5
    np.testing.assert_array_equal(np.asarray(flat[("conv_norm_out", "scale")]), 1.0)


def test_saved_unet_loads_in_diffusers_with_equal_outputs(tiny_unets, tmp_path):
    tiny, inputs = tiny_unets("sdxl"), _inputs("sdxl")
    rng = np.random.default_rng(7)  # params of our own, unlike the ones loaded
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), tiny.params)
    unet.save_params(tiny.model, params, tmp_path)
    torch_model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = _torch_output(torch_model, inputs)
    _assert_parity(tiny.forward(params, inputs), expected, "round trip unet sdxl")
    assert unet.read_config(tmp_path) == tiny.model.config
    _, reloaded = unet.load(tmp_path)
    chex.assert_trees_all_equal(reloaded, params)


def test_sharded_index_and_fp16_variant_load_like_the_single_file(sd1, tmp_path):
    sharded = tmp_path / "sharded"
    sd1.torch_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    chex.assert_trees_all_equal(unet.load(sharded)[1], sd1.params)
    half = tmp_path / "half"
    _torch_unet("sd1").to(torch.float16).save_pretrained(half, variant="fp16", safe_serialization=True)
    _, half_params = unet.load(half, variant="fp16")
    rounded = jax.tree.map(lambda x: x.astype(jnp.float16).astype(jnp.float32), sd1.params)
    chex.assert_trees_all_equal(half_params, rounded)


def test_missing_weight_and_wrong_shape_raise_naming_file_and_key(sd1, tmp_path):
    wider = unet.UNet2DConditionModel(unet.UNetConfig.from_dict(dict(CONFIGS["sd1"], cross_attention_dim=48)))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: weight "
                                         r"'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight' "
                                         r"has shape \(32, 32\), the config expects \(32, 48\)"):
        unet.load_params(wider, sd1.folder)
    sd1.torch_model.save_pretrained(tmp_path, safe_serialization=True)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(file)
    del state["time_embedding.linear_2.bias"]
    safetensors.torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: missing weight "
                                         r"'time_embedding\.linear_2\.bias' \(our time_embedding/linear_2/bias\)"):
        unet.load(tmp_path)


FSDP_RULES = [("conv_out", "fsdp"), ("embed", "fsdp"), ("mlp", "fsdp")]


def test_fsdp_load_on_eight_devices_matches_one_device(sd1):
    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    shardings = nn.logical_to_mesh_sharding(unet.logical_partition_specs(sd1.model), mesh, FSDP_RULES)
    with jax.transfer_guard("disallow"):
        params = unet.load_params(sd1.model, sd1.folder, shardings=shardings)
    chex.assert_trees_all_equal(params, sd1.params)
    for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert param.sharding.is_equivalent_to(sharding, param.ndim)
    flat = traverse_util.flatten_dict(params)
    to_q = flat[("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")]
    assert to_q.sharding.spec == P("fsdp", None) and to_q.addressable_shards[0].data.shape == (16, 64)
    conv = flat[("up_blocks_1", "resnets_0", "conv1", "kernel")]
    assert conv.sharding.spec == P(None, None, None, "fsdp") and conv.addressable_shards[0].data.shape == (3, 3, 96, 8)
    inputs = _inputs("sd1")
    out = _forward(sd1.model)(params, jax.device_put(inputs, NamedSharding(mesh, P())))
    chex.assert_trees_all_close(out, sd1.forward(sd1.params, inputs), rtol=1e-5, atol=1e-5)


def test_nhwc_layout_and_bfloat16_compute(sd1):
    inputs = _inputs("sd1")
    expected = np.asarray(sd1.forward(sd1.params, inputs))
    nhwc_model = unet.load(sd1.folder, layout="NHWC")[0]
    nhwc_inputs = dict(inputs, sample=inputs["sample"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(
        np.asarray(_forward(nhwc_model)(sd1.params, nhwc_inputs)), expected.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6
    )
    half_model, half_params = unet.load(sd1.folder, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half_params)} == {jnp.dtype(jnp.float32)}
    half = _forward(half_model)(half_params, inputs)
    assert half.dtype == jnp.bfloat16
    _assert_parity(half.astype(jnp.float32), expected, "sd1 bfloat16 compute vs float32", tolerance=0.05)


def test_param_paths_follow_diffusers_names(sd1):
    flat = traverse_util.flatten_dict(sd1.params)
    assert {weights.diffusers_key(path) for path in flat} == set(sd1.torch_model.state_dict())
    kernels = {path: value.ndim for path, value in flat.items() if path[-1] == "kernel"}
    assert set(kernels.values()) == {2, 4}
    assert kernels[("time_embedding", "linear_1", "kernel")] == 2
    assert kernels[("down_blocks_0", "attentions_0", "proj_in", "kernel")] == 4  # SD 1.x: a 1x1 conv
    assert weights.diffusers_key(("add_embedding", "linear_2", "bias")) == "add_embedding.linear_2.bias"
    ff = ("mid_block", "attentions_0", "transformer_blocks_1", "ff", "net_0", "proj", "kernel")
    assert weights.diffusers_key(ff) == "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj.weight"
    specs = traverse_util.flatten_dict(unet.logical_partition_specs(sd1.model))
    assert specs[("conv_in", "kernel")] == P(None, None, "conv_in", "conv_out")
    assert specs[("down_blocks_0", "attentions_0", "proj_in", "kernel")] == P(None, None, "conv_in", "embed")
    assert specs[("down_blocks_0", "resnets_0", "time_emb_proj", "kernel")] == P("time_embed", "conv_out")
    assert specs[("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_2", "kernel")] == P("mlp", "embed")
    assert specs[("conv_norm_out", "scale")] == P("norm")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_reading_and_what_is_not_supported(tiny_unets, name):
    tiny = tiny_unets(name)
    config = unet.read_config(tiny.folder)
    assert config == tiny.model.config and unet.UNetConfig.from_dict(config.to_dict()) == config
    assert config.heads_per_level == ((2, 2) if name.startswith("sd1") else (2, 4))
    assert config.transformer_depth_per_level == ((1, 2) if name == "sdxl" else (1, 1))
    assert config.time_embed_dim == (96 if name == "sd1_options" else 128)
    raw = json.loads((tiny.folder / "config.json").read_text())
    for entry, value in [("only_cross_attention", True), ("class_embed_type", "timestep"),
                         ("resnet_time_scale_shift", "scale_shift"), ("dropout", 0.1)]:
        with pytest.raises(ValueError, match=rf"unet config: {entry}={value!r} is not supported"):
            unet.UNetConfig.from_dict(dict(raw, **{entry: value}))
    with pytest.raises(ValueError, match="down_block_types: only"):
        unet.UNetConfig.from_dict(dict(raw, down_block_types=["AttnDownBlock2D", "DownBlock2D"]))
    abstract, inputs = unet.abstract_params(tiny.model), _inputs(name)

    def shapes(**changes):
        changed = dict(inputs, **changes)
        return jax.eval_shape(
            lambda p, i: tiny.model.apply({"params": p}, i["sample"], i["timesteps"], i["context"], i["added"]),
            abstract, changed,
        )

    assert shapes().shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"height and width multiples of 2"):
        shapes(sample=jax.ShapeDtypeStruct((2, 4, 15, 16), jnp.float32))
    with pytest.raises(ValueError, match=r"expected \(B, S, 32\)"):
        shapes(context=jax.ShapeDtypeStruct((2, 7, 16), jnp.float32))
    if name == "sdxl":
        with pytest.raises(ValueError, match="needs added_cond_kwargs text_embeds and time_ids"):
            shapes(added=None)


def test_a_models_shapes_and_axes_are_traced_once_however_often_they_are_asked(monkeypatch):
    """Loading asks for a model's abstract params and logical axes three or four times; each used
    to trace the whole init. Equal modules share one trace, other configs or dtypes get their own."""
    from gal_jax.nn import layers

    monkeypatch.setattr(layers, "_BOXED_SHAPES", {})
    traces = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda f, *a, **k: traces.append(f) or real(f, *a, **k))
    config = unet.UNetConfig.from_dict(CONFIGS["sd1"])
    model = unet.UNet2DConditionModel(config)
    first = unet.abstract_params(model)
    specs = unet.logical_partition_specs(model)
    again = unet.abstract_params(unet.UNet2DConditionModel(config))  # an equal module, built anew
    assert len(traces) == 1
    assert jax.tree.structure(first) == jax.tree.structure(again) and jax.tree.leaves(first) == jax.tree.leaves(again)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(first)
    half = unet.abstract_params(unet.UNet2DConditionModel(config, param_dtype=jnp.float16))
    assert len(traces) == 2 and {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.float16)}
    sd2 = unet.abstract_params(unet.UNet2DConditionModel(unet.UNetConfig.from_dict(CONFIGS["sd2"])))
    assert len(traces) == 3 and jax.tree.structure(sd2) != jax.tree.structure(first)
