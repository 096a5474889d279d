"""Our Flax CLIP (gal_jax.nn.clip) against transformers' PyTorch CLIP on tiny random models; the
safetensors loading and saving; the attention dispatch of gal_jax.nn.layers."""

import functools
import json
import logging
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gal_jax.nn import clip, layers, weights

import parity  # tests/parity.py
from parity import errors as _errors

TOLERANCE = 1e-5  # relative to the reference's largest magnitude, float32
LEGACY_VOCAB = 99
# Two tokens past the end-of-text id: added tokens that must not be taken for end-of-text.
EXTENDED_VOCAB = 49410
TINY_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(TINY_TOWER, image_size=32, patch_size=8)


def _text_config(hidden_act: str, eos_token_id: int) -> dict:
    vocab = LEGACY_VOCAB if eos_token_id == 2 else EXTENDED_VOCAB
    return dict(
        TINY_TOWER, vocab_size=vocab, max_position_embeddings=16, hidden_act=hidden_act,
        projection_dim=24, eos_token_id=eos_token_id,
    )


def _token_ids(eos_token_id: int, batch: int = 3, length: int = 16) -> np.ndarray:
    """Returns ids whose end-of-text sits at a different place per row, padded with it after.

    Legacy (eos 2) rows carry their largest id at the pooled position, as OpenAI's vocabulary
    does; the others hold a larger added token before end-of-text, which pooling must skip.
    """
    rng = np.random.default_rng(0)
    if eos_token_id == 2:
        ids = rng.integers(3, LEGACY_VOCAB - 1, (batch, length))
        for row in range(batch):
            ids[row, 4 + 3 * row] = LEGACY_VOCAB - 1
        return ids.astype(np.int32)
    ids = rng.integers(3, 1000, (batch, length))
    for row in range(batch):
        end = 4 + 3 * row
        ids[row, end - 1] = EXTENDED_VOCAB - 1
        ids[row, end:] = eos_token_id
    return ids.astype(np.int32)


_assert_parity = functools.partial(parity.assert_parity, tolerance=TOLERANCE)


def _relative_error(ours, reference) -> float:
    return _errors(ours, reference)[1]


def _saved(torch_model, folder, **save_kwargs):
    torch_model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


@pytest.fixture(
    scope="module", params=[("quick_gelu", 2), ("gelu", 49407)], ids=["quick_gelu-eos2", "gelu-eos49407"]
)
def torch_clip(request, tmp_path_factory):
    """(folder, torch CLIPModel, eos id) of a tiny random CLIP, both towers using one activation."""
    hidden_act, eos = request.param
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=_text_config(hidden_act, eos),
        vision_config=dict(TINY_VISION, hidden_act=hidden_act),
        projection_dim=24,
        logit_scale_init_value=2.0,
    )
    model = transformers.CLIPModel(config).eval()
    return _saved(model, tmp_path_factory.mktemp("clip")), model, eos


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)


def test_clip_features_and_logits_match_transformers(torch_clip, pixels):
    folder, torch_model, eos = torch_clip
    model, params = clip.load(folder)
    assert isinstance(model, clip.ClipModel)
    ids = _token_ids(eos)
    torch_ids, torch_pixels = torch.from_numpy(ids).long(), torch.from_numpy(pixels)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch_ids, pixel_values=torch_pixels)
        vision = torch_model.vision_model(pixel_values=torch_pixels)
        text_features = torch_model.get_text_features(input_ids=torch_ids)
        image_features = torch_model.get_image_features(pixel_values=torch_pixels)
    variables = {"params": params}
    ours_text = model.apply(variables, jnp.asarray(ids), method=model.text_features)
    ours_image = model.apply(variables, jnp.asarray(pixels), method=model.image_features)
    _assert_parity(ours_text, text_features, "text features")
    _assert_parity(ours_image, image_features, "image features")
    ours_vision = model.apply(variables, jnp.asarray(pixels), method=lambda m, x: m.vision_model(x))
    _assert_parity(ours_vision.last_hidden_state, vision.last_hidden_state, "vision last hidden state")
    _assert_parity(ours_vision.pooled_output, vision.pooler_output, "vision pooled output")
    ours = model.apply(variables, jnp.asarray(ids), jnp.asarray(pixels))
    _assert_parity(ours.logits_per_image, theirs.logits_per_image, "logits per image")
    _assert_parity(ours.logits_per_text, theirs.logits_per_text, "logits per text")


@pytest.mark.parametrize(
    "hidden_act, eos, architecture",
    [("quick_gelu", 2, "CLIPTextModel"), ("gelu", 49407, "CLIPTextModelWithProjection")],
)
def test_text_encoder_matches_transformers(tmp_path, hidden_act, eos, architecture):
    torch.manual_seed(0)
    torch_cls = getattr(transformers, architecture)
    torch_model = torch_cls(transformers.CLIPTextConfig(**_text_config(hidden_act, eos))).eval()
    model, params = clip.load(_saved(torch_model, tmp_path))
    assert isinstance(model, clip.ClipTextModel)
    assert model.projection == (architecture == "CLIPTextModelWithProjection")
    ids = _token_ids(eos)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    ours = model.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    _assert_parity(ours.last_hidden_state, theirs.last_hidden_state, f"{architecture} last hidden state")
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    _assert_parity(ours.hidden_states[-2], theirs.hidden_states[-2], f"{architecture} penultimate")
    if model.projection:
        _assert_parity(ours.text_embeds, theirs.text_embeds, f"{architecture} text embeds")
    else:
        _assert_parity(ours.pooled_output, theirs.pooler_output, f"{architecture} pooled output")
        assert ours.text_embeds is None


def test_pooling_takes_first_end_of_text_not_a_larger_added_token(tmp_path):
    config = clip.ClipTextConfig(**_text_config("gelu", 49407))
    model = clip.ClipTextModel(config)
    params = clip.init_params(model, jax.random.key(0))
    ids = _token_ids(49407)
    out = model.apply({"params": params}, jnp.asarray(ids))
    first_eos = (ids == 49407).argmax(axis=1)
    assert not np.array_equal(first_eos, ids.argmax(axis=1))
    expected = np.asarray(out.last_hidden_state)[np.arange(len(ids)), first_eos]
    np.testing.assert_array_equal(np.asarray(out.pooled_output), expected)


@pytest.mark.parametrize("stored, variant", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_half_precision_weights_load_cast_to_the_param_dtype(tmp_path, stored, variant):
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_config("quick_gelu", 2)))
    folder = _saved(torch_model.to(stored), tmp_path, variant=variant)
    assert (folder / f"model.{variant}.safetensors").is_file()
    model, params = clip.load(folder, variant=variant)
    kernel = params["text_model"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"]
    assert kernel.dtype == jnp.float32
    stored_weight = torch_model.text_model.encoder.layers[1].mlp.fc1.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel), stored_weight.T)
    bf16_model, bf16_params = clip.load(folder, variant=variant, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}
    assert bf16_model.param_dtype == jnp.bfloat16


def test_sharded_index_loads_like_the_single_file(torch_clip, tmp_path):
    folder, torch_model, _ = torch_clip
    sharded = _saved(torch_model, tmp_path, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, params = clip.load(sharded)
    _, single = clip.load(folder)
    chex.assert_trees_all_equal(params, single)


def test_missing_weight_raises_naming_file_and_key(tmp_path):
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_config("gelu", 2)))
    folder = _saved(torch_model, tmp_path)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    message = r"model\.safetensors: missing weight 'text_model\.encoder\.layers\.1\.mlp\.fc2\.bias'"
    with pytest.raises(ValueError, match=message):
        clip.load(folder)


def test_shape_mismatch_raises_naming_file_and_key(tmp_path):
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_text_config("gelu", 2)))
    folder = _saved(torch_model, tmp_path)
    model = clip.ClipTextModel(clip.ClipTextConfig(**dict(_text_config("gelu", 2), intermediate_size=40)))
    message = (
        r"model\.safetensors: weight 'text_model\.encoder\.layers\.0\.mlp\.fc1\.bias' has shape \(37,\), "
        r"the config expects \(40,\)"
    )
    with pytest.raises(ValueError, match=message):
        clip.load_params(model, folder)


def test_missing_shard_raises_naming_index_and_shard(torch_clip, tmp_path):
    _, torch_model, _ = torch_clip
    sharded = _saved(torch_model, tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"index\.json: names the shard {shard.name}, which is missing"):
        clip.load(sharded)


def test_saved_clip_loads_in_transformers_with_equal_outputs(tmp_path, pixels):
    config = clip.ClipConfig(
        text=clip.ClipTextConfig(**_text_config("gelu", 49407)),
        vision=clip.ClipVisionConfig(**TINY_VISION),
        projection_dim=24,
    )
    model = clip.ClipModel(config)
    params = clip.init_params(model, jax.random.key(1))
    clip.save_params(model, params, tmp_path)
    torch_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    ids = _token_ids(49407)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels))
    ours = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    _assert_parity(ours.text_embeds, theirs.text_embeds, "round trip text embeds")
    _assert_parity(ours.image_embeds, theirs.image_embeds, "round trip image embeds")
    _assert_parity(ours.logits_per_image, theirs.logits_per_image, "round trip logits")
    assert clip.read_config(tmp_path) == config
    _, reloaded = clip.load(tmp_path)
    chex.assert_trees_all_equal(reloaded, params)


def test_saved_text_encoder_with_projection_loads_in_transformers(tmp_path):
    config = clip.ClipTextConfig(**_text_config("quick_gelu", 2))
    model = clip.ClipTextModel(config, projection=True)
    params = clip.init_params(model, jax.random.key(2))
    clip.save_params(model, params, tmp_path, dtype=np.float16)
    torch_model = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path)
    ids = _token_ids(2)
    with torch.no_grad():
        theirs = torch_model.eval()(input_ids=torch.from_numpy(ids).long())
    half_params = jax.tree.map(lambda x: x.astype(jnp.float16).astype(jnp.float32), params)
    ours = model.apply({"params": half_params}, jnp.asarray(ids))
    _assert_parity(ours.text_embeds, theirs.text_embeds, "fp16 round trip text embeds")


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()).reshape(8), ("fsdp",))


def test_replicated_and_fsdp_loads_on_eight_devices_match_one_device(torch_clip, pixels):
    folder, _, eos = torch_clip
    assert jax.device_count() == 8
    model, single = clip.load(folder)
    mesh = _mesh()
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), single)
    fsdp = nn.logical_to_mesh_sharding(clip.logical_partition_specs(model), mesh, [("embed", "fsdp")])
    ids, images = _token_ids(eos), pixels
    expected = model.apply({"params": single}, jnp.asarray(ids), jnp.asarray(images))
    forward = jax.jit(model.apply)
    for shardings in (replicated, fsdp):
        with jax.transfer_guard("disallow"):
            params = clip.load_params(model, folder, shardings=shardings)
        chex.assert_trees_all_equal(params, single)
        for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
            assert param.sharding.is_equivalent_to(sharding, param.ndim)
        inputs = jax.device_put((ids, images), NamedSharding(mesh, P()))
        out = forward({"params": params}, *inputs)
        chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)
    kernel = params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (4, 32)


def test_params_carry_logical_axis_names():
    model = clip.ClipModel(clip.ClipConfig(
        text=clip.ClipTextConfig(**_text_config("gelu", 2)), vision=clip.ClipVisionConfig(**TINY_VISION),
        projection_dim=24,
    ))
    specs = traverse_util.flatten_dict(clip.logical_partition_specs(model))
    assert specs[("text_model", "embeddings", "token_embedding", "embedding")] == P("vocab", "embed")
    q_proj = ("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")
    assert specs[q_proj] == P("embed", "heads")
    assert specs[("vision_model", "encoder", "layers_1", "mlp", "fc2", "kernel")] == P("mlp", "embed")
    assert specs[("text_projection", "kernel")] == P("embed", "projection")
    assert specs[("vision_model", "embeddings", "patch_embedding", "kernel")] == P(None, None, None, "embed")
    assert specs[("logit_scale",)] == P()
    assert set(specs) == set(traverse_util.flatten_dict(clip.abstract_params(model)))


def test_bfloat16_compute_stays_close_to_float32(torch_clip, pixels):
    folder, _, eos = torch_clip
    model, params = clip.load(folder)
    half_model, half_params = clip.load(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = jnp.asarray(_token_ids(eos))
    full = model.apply({"params": params}, ids, method=model.text_features)
    half = half_model.apply({"params": half_params}, ids, method=half_model.text_features)
    assert half.dtype == jnp.bfloat16
    assert _relative_error(half, full) < 0.05


def test_config_reading_follows_transformers(torch_clip, tmp_path):
    folder, torch_model, eos = torch_clip
    config = clip.read_config(folder)
    assert config.text.eos_token_id == eos
    assert config.text.hidden_act == torch_model.config.text_config.hidden_act
    assert config.vision.num_positions == 17
    assert clip.ClipConfig.from_dict(config.to_dict()) == config
    legacy = dict(config.to_dict(), text_config={"hidden_size": 64}, text_config_dict=config.text.to_dict())
    assert clip.ClipConfig.from_dict(legacy).text == config.text
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw["text_config"], model_type="clip_text_model")))
    assert clip.read_config(tmp_path) == config.text
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        clip.ClipTextConfig(hidden_act="relu")


def test_torch_key_maps_our_paths_to_state_dict_names():
    assert weights.torch_key(("text_model", "encoder", "layers_11", "self_attn", "q_proj", "kernel")) == (
        "text_model.encoder.layers.11.self_attn.q_proj.weight"
    )
    assert weights.torch_key(("vision_model", "pre_layrnorm", "scale")) == "vision_model.pre_layrnorm.weight"
    assert weights.torch_key(("text_model", "final_layer_norm", "bias")) == "text_model.final_layer_norm.bias"
    assert weights.torch_key(("logit_scale",)) == "logit_scale"
    conv = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # HWIO
    assert weights.to_torch_layout(("patch_embedding", "kernel"), conv).shape == (5, 4, 2, 3)


# ---------------------------------------------------------------------------------------------
# Attention dispatch (gal_jax.nn.layers)
# ---------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, causal):
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_attention_matches_the_reference(causal, implementation):
    q, k, v = np.random.default_rng(2).standard_normal((3, 2, 7, 4, 8)).astype(np.float32)
    ours = layers.dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=causal, implementation=implementation
    )
    assert _relative_error(ours, _reference_attention(q, k, v, causal)) <= 1e-6


def test_attention_mask_hides_keys():
    q, k, v = np.random.default_rng(3).standard_normal((3, 1, 5, 2, 8)).astype(np.float32)
    mask = np.ones((1, 1, 5, 5), bool)
    mask[..., 3:] = False
    ours = layers.dot_product_attention(*(jnp.asarray(x) for x in (q, k, v)), mask=jnp.asarray(mask))
    expected = _reference_attention(q, k[:, :3], v[:, :3], causal=False)
    assert _relative_error(ours, expected) <= 1e-6


def test_auto_attention_picks_xla_on_cpu():
    assert layers.current_platform()[0] == "cpu"
    choice, reason = layers.choose_attention_implementation(
        "auto", platform="cpu", dtype=jnp.bfloat16, head_dim=64, seq_lengths=(77, 77)
    )
    assert choice == "xla" and "cpu" in reason


@pytest.mark.parametrize(
    "dtype, head_dim, has_bias, seq, expected",
    [
        (jnp.bfloat16, 64, False, 77, "cudnn"),
        (jnp.float16, 64, False, 77, "cudnn"),
        (jnp.float32, 64, False, 77, "xla"),
        (jnp.bfloat16, 60, False, 77, "xla"),
        (jnp.bfloat16, 160, False, 77, "xla"),
        (jnp.bfloat16, 64, True, 77, "xla"),
        (jnp.bfloat16, 64, True, 78, "cudnn"),
    ],
)
def test_auto_attention_picks_cudnn_only_where_it_applies(dtype, head_dim, has_bias, seq, expected):
    choice, _ = layers.choose_attention_implementation(
        "auto", platform="cuda", dtype=dtype, head_dim=head_dim, seq_lengths=(seq, seq), has_bias=has_bias
    )
    assert choice == expected


def test_requested_attention_is_kept_and_unknown_raises():
    assert layers.choose_attention_implementation(
        "cudnn", platform="cpu", dtype=jnp.float32, head_dim=3, seq_lengths=(1, 1)
    ) == ("cudnn", "requested")
    x = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="attention implementation 'splash'"):
        layers.dot_product_attention(x, x, x, implementation="splash")


@pytest.mark.parametrize(
    "seq, has_bias, expected",
    [((4096, 4096), False, "flash"), ((1024, 1024), False, "flash"), ((4096, 77), False, "xla"),
     ((4096, 4096), True, "xla"), ((100, 100), False, "xla")],
)
def test_auto_attention_picks_flash_on_tpu_only_for_whole_blocks_without_bias(seq, has_bias, expected):
    choice, reason = layers.choose_attention_implementation(
        "auto", platform="tpu", dtype=jnp.bfloat16, head_dim=40, seq_lengths=seq, has_bias=has_bias
    )
    assert choice == expected, reason


def test_flash_attention_refuses_what_its_kernel_cannot_take():
    x = jnp.zeros((1, 77, 2, 8))
    with pytest.raises(ValueError, match="not multiples of 128; use attention='xla'"):
        layers.dot_product_attention(x, x, x, implementation="flash")
    y = jnp.zeros((1, 128, 2, 8))
    with pytest.raises(ValueError, match="masks and biases are not supported"):
        layers.dot_product_attention(y, y, y, mask=jnp.ones((1, 1, 128, 128), bool), implementation="flash")


def test_layer_norm_matches_torch_in_float32_for_half_inputs():
    x = np.random.default_rng(4).standard_normal((2, 5, 32)).astype(np.float32) * 30 + 7
    norm = layers.LayerNorm(epsilon=1e-5, dtype=jnp.bfloat16)
    variables = norm.init(jax.random.key(0), jnp.asarray(x))
    ours = norm.apply(variables, jnp.asarray(x, jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    theirs = torch.nn.functional.layer_norm(torch.from_numpy(x).bfloat16().float(), (32,), eps=1e-5).numpy()
    assert _relative_error(ours.astype(jnp.float32), theirs) <= 1e-2


def test_auto_attention_logs_its_choice_once(caplog):
    layers._log_attention_choice.cache_clear()
    x = jnp.ones((1, 3, 2, 8))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            layers.dot_product_attention(x, x, x, implementation="auto")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: auto")]
    assert logged == ["attention: auto -> xla (platform cpu has no cuDNN)"]


def test_inputs_of_the_wrong_shape_raise():
    config = clip.ClipConfig(
        text=clip.ClipTextConfig(**_text_config("gelu", 2)), vision=clip.ClipVisionConfig(**TINY_VISION),
        projection_dim=24,
    )
    model = clip.ClipModel(config)
    params = clip.abstract_params(model)

    def shapes_of(method, inputs):
        return jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=method), params, inputs)

    with pytest.raises(ValueError, match="sequence length 17 exceeds max_position_embeddings 16"):
        shapes_of(model.text_features, jax.ShapeDtypeStruct((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"expected NCHW \(B, 3, 32, 32\)"):
        shapes_of(model.image_features, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert shapes_of(model.image_features, jax.ShapeDtypeStruct((5, 3, 32, 32), jnp.float32)).shape == (5, 24)
