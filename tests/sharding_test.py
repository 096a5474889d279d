"""The mesh and parameter shardings from logical axis names: the rule table, uneven axes, optimizer
states, the 'tensor' axis."""

import re

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import Mesh, PartitionSpec as P

from gal_jax import models, sharding, train
from gal_jax.nn import clip as nn_clip
from gal_jax.nn import unet as nn_unet

MESH_SHAPE = {"data": 2, "fsdp": 4, "tensor": 1}


def test_the_first_applicable_rule_shards_its_dimension():
    rules = (("embed", "fsdp"), ("mlp", "fsdp"))
    assert sharding.spec_for(("embed", "mlp"), (256, 1024), MESH_SHAPE, rules) == P("fsdp", None)
    assert sharding.spec_for(("mlp", "embed"), (1024, 256), MESH_SHAPE, rules) == P(None, "fsdp")
    # Rules are tried in their order, not the array's.
    assert sharding.spec_for(("embed", "mlp"), (256, 1024), MESH_SHAPE, rules[::-1]) == P(None, "fsdp")


def test_an_uneven_dimension_stays_whole_and_the_next_rule_takes_the_axis():
    rules = (("embed", "fsdp"), ("mlp", "fsdp"))
    assert sharding.spec_for(("embed", "mlp"), (250, 1024), MESH_SHAPE, rules) == P(None, "fsdp")
    assert sharding.spec_for(("embed", "mlp"), (250, 1022), MESH_SHAPE, rules) == P(None, None)


def test_small_arrays_unnamed_axes_and_a_mesh_axis_of_one_stay_replicated():
    rules = sharding.DEFAULT_LOGICAL_RULES
    assert sharding.spec_for(("embed",), (320,), MESH_SHAPE, rules) == P()
    assert sharding.spec_for((None, None), (1024, 1024), MESH_SHAPE, rules) == P(None, None)
    assert sharding.spec_for(("norm", "embed"), (1024, 1024), MESH_SHAPE, (("norm", None),)) == P(None, None)
    assert sharding.spec_for(("embed", "mlp"), (256, 1024), {"data": 8, "fsdp": 1, "tensor": 1}, rules) == P(None, None)


def test_bad_rules_are_refused_naming_the_rule():
    assert sharding.logical_rules(None) == sharding.DEFAULT_LOGICAL_RULES
    assert sharding.logical_rules([["embed", "data"]]) == (("embed", "data"),)
    assert sharding.logical_rules([["embed", "tensor"]]) == (("embed", "tensor"),)
    with pytest.raises(ValueError, match=r"mesh.rules: \('embed', 'model'\) is not a"):
        sharding.logical_rules((("embed", "model"),))
    with pytest.raises(ValueError, match="mesh.rules: 'embed' is not a"):
        sharding.logical_rules(("embed",))
    with pytest.raises(ValueError, match="the mesh has no axis 'fsdp'"):
        sharding.spec_for(("embed",), (1 << 16,), {"data": 8}, (("embed", "fsdp"),))
    with pytest.raises(ValueError, match="the mesh has no axis 'tensor'"):  # a hand-made two-axis mesh
        sharding.spec_for(("embed", "heads"), (256, 256), {"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match="do not match the shape"):
        sharding.spec_for(("embed",), (4, 4), MESH_SHAPE)


def test_unet_params_and_their_adam_moments_share_shardings_from_logical_axes(loaded_sd):
    sd, params = loaded_sd
    mesh = sharding.make_mesh(2, 4)
    axes = sd.logical_axes().unet
    state = train.abstract_train_state(params.unet, optax.adamw(1e-4), mesh, axes)
    flat_axes = sharding.logical_axes_by_path(axes)
    flat_params = traverse_util.flatten_dict(state.params)
    sharded = 0
    for path, leaf in flat_params.items():
        expected = sharding.spec_for(flat_axes[path], leaf.shape, dict(mesh.shape))
        assert leaf.sharding.spec == expected, path
        sharded += "fsdp" in expected
        for dim, name in zip(leaf.shape, expected):
            assert name is None or dim % 4 == 0
    assert sharded >= 10
    # Each AdamW moment sits where its param sits; the step counters are replicated.
    mu, nu = state.opt_state[0].mu, state.opt_state[0].nu
    for moments in (mu, nu):
        for path, leaf in traverse_util.flatten_dict(moments).items():
            assert leaf.sharding == flat_params[path].sharding
    assert state.step.sharding.spec == P() and state.opt_state[0].count.sharding.spec == P()
    conv = flat_params[("down_blocks_1", "resnets_0", "conv1", "kernel")]
    assert flat_axes[("down_blocks_1", "resnets_0", "conv1", "kernel")][-1] == "conv_out"
    assert conv.sharding.spec == P(None, None, None, "fsdp")


def test_frozen_inputs_shard_the_vae_and_text_encoder_by_their_own_axes(loaded_sd):
    sd, params = loaded_sd
    mesh = sharding.make_mesh(2, 4)
    # The frozen part of the model tree as under LoRA: the whole base UNet and the text encoder.
    rest = {"unet": params.unet, "text_encoder": params.text_encoder}
    frozen = train.abstract_frozen_inputs(params.vae, rest, sd, mesh)
    table = frozen.model["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert table.sharding.spec == P(None, "fsdp")  # "embed" (32 wide) comes before "vocab" in the rules
    unet_axes = sharding.logical_axes_by_path(sd.logical_axes().unet)
    for path, leaf in traverse_util.flatten_dict(frozen.model["unet"]).items():
        assert leaf.sharding.spec == sharding.spec_for(unet_axes[path], leaf.shape, dict(mesh.shape))
    vae_axes = sharding.logical_axes_by_path(sd.logical_axes().vae)
    for path, leaf in traverse_util.flatten_dict(frozen.vae).items():  # the tiny VAE is too small to shard
        assert leaf.sharding.spec == sharding.spec_for(vae_axes[path], leaf.shape, dict(mesh.shape))
    assert all(leaf.sharding.spec == P() for leaf in jax.tree_util.tree_leaves(frozen.noise_schedule))
    placed = train.place_frozen(params.vae, rest, sd, mesh)
    for leaf, want in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(frozen)):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
    np.testing.assert_array_equal(np.asarray(placed.vae["decoder"]["conv_out"]["kernel"]),
                                  np.asarray(params.vae["decoder"]["conv_out"]["kernel"]))


def test_logical_axes_cover_every_param(loaded_sd):
    sd, params = loaded_sd
    axes = sd.logical_axes()
    for name in ("unet", "vae", "text_encoder"):
        by_path = sharding.logical_axes_by_path(getattr(axes, name))
        flat = traverse_util.flatten_dict(getattr(params, name))
        assert by_path.keys() == flat.keys()
        assert all(len(by_path[p]) == flat[p].ndim for p in flat)
    assert isinstance(sd, models.StableDiffusion)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_facade_loads_every_weight_straight_onto_its_sharding(tiny_models, loaded_sd, mesh_shape, monkeypatch):
    """load_stable_diffusion(mesh=...) puts each array where the trainer lays it out, with the
    values of an unsharded load, and no array is first gathered on one device."""
    sd, params = loaded_sd
    if mesh_shape[2] > 1:  # split every attention and MLP layer of the tiny model, not only its largest
        monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 1)
    mesh = sharding.make_mesh(*mesh_shape)
    with jax.transfer_guard("disallow"):  # only the explicit per-shard copies of the reader
        _, placed = models.load_stable_diffusion(tiny_models["sd"], mesh=mesh)
    axes = sd.logical_axes()
    sharded = {"fsdp": 0, "tensor": 0}
    for component in ("unet", "vae", "text_encoder"):
        expected = sharding.param_shardings(getattr(params, component), mesh, getattr(axes, component))
        got, want = getattr(placed, component), getattr(params, component)
        for path, leaf in traverse_util.flatten_dict(got).items():
            assert leaf.sharding == traverse_util.flatten_dict(expected)[path], (component, path)
            sharded = {axis: count + (axis in leaf.sharding.spec) for axis, count in sharded.items()}
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(traverse_util.flatten_dict(want)[path]))
    assert sharded["fsdp"] >= 10 and (sharded["tensor"] >= 10) == (mesh_shape[2] > 1)
    if mesh_shape[2] > 1:
        q_proj = placed.text_encoder["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert q_proj.sharding.spec == P("fsdp", "tensor") and q_proj.addressable_shards[0].data.shape == (16, 16)
    # CLIP for data-parallel scoring: no rules, every array replicated on the mesh.
    _, clip_params = models.load_clip(tiny_models["clip"], mesh=mesh, rules=())
    assert all(leaf.sharding.is_fully_replicated and leaf.sharding.mesh == mesh
               for leaf in jax.tree_util.tree_leaves(clip_params))


def test_activation_specs_shard_the_batch_only_where_it_divides():
    spec = sharding.activation_spec(sharding.ACTIVATION_NHWC, (16, 8, 8, 32), MESH_SHAPE)
    assert spec == P(("data", "fsdp"), None, None, None)
    # Axes of size 1 drop out; an uneven batch is left to XLA, never forced replicated.
    assert sharding.activation_spec(sharding.ACTIVATION_NHWC, (16, 8, 8, 32), {"data": 1, "fsdp": 8}) == P("fsdp", None, None, None)
    assert sharding.activation_spec(sharding.ACTIVATION_NHWC, (6, 8, 8, 32), MESH_SHAPE) is None
    assert sharding.activation_spec(sharding.ACTIVATION_TOKENS, (16, 64, 32), {"data": 1, "fsdp": 1}) is None


def test_unet_activations_are_pinned_batch_sharded_only_inside_the_context(loaded_sd):
    sd, params = loaded_sd
    mesh = sharding.make_mesh(2, 4)
    x = jax.ShapeDtypeStruct((8, sd.latent_channels, 8, 8), np.float32)
    context = jax.ShapeDtypeStruct((8, sd.max_length, sd.unet.config.cross_attention_dim), np.float32)

    def constraints(jaxpr=None):
        # A new function each time: make_jaxpr caches traces by function, and the context is no key.
        forward = lambda p, x, c: sd.apply_unet(p, x, 10, c)  # noqa: E731
        jaxpr = jaxpr or jax.make_jaxpr(forward)(params.unet, x, context).jaxpr
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                found.append(eqn.params["sharding"].spec)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    found += constraints(inner)
        return found

    assert constraints() == []
    with sharding.activation_sharding(mesh):
        pinned = constraints()
    # conv_in, 4 down, mid, 4 up blocks (NHWC) and every transformer block's tokens.
    transformers = len(nn_unet.cross_attention_layers(sd.unet.config))
    assert len(pinned) == 1 + 2 * len(sd.unet.config.block_out_channels) + 1 + transformers
    assert all(spec[0] == ("data", "fsdp") and set(spec[1:]) == {None} for spec in pinned)


# ---------------------------------------------------------------------------------------------
# The mesh's 'tensor' axis


def test_the_mesh_has_three_axes_and_minus_one_takes_the_remaining_devices():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, 1, -1).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert dict(sharding.make_mesh(-1, 1, 2).shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    # 'tensor' varies fastest: a tensor group is neighbouring devices.
    assert [d.id for d in sharding.make_mesh(4, 1, 2).devices[1, 0]] == [2, 3]
    # A config written before mesh.tensor existed means tensor=1.
    old = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "rules": None})
    assert dict(sharding.mesh_from_config(old).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    # The batch stays split over ('data', 'fsdp') only, replicated over 'tensor'.
    assert sharding.num_batch_shards(sharding.make_mesh(2, 2, 2)) == 4
    assert sharding.batch_sharding(sharding.make_mesh(2, 2, 2)).spec == P(("data", "fsdp"))


@pytest.mark.parametrize("sizes, message", [
    ((2, 2, 3), "mesh: mesh.data=2 x mesh.fsdp=2 x mesh.tensor=3 does not cover the 8 available devices"),
    ((-1, 1, 3), "mesh: mesh.data=-1 x mesh.fsdp=1 x mesh.tensor=3 does not cover the 8 available devices"),
    ((-1, 1, -1), "mesh: at most one of mesh.data, mesh.fsdp and mesh.tensor may be -1 (got mesh.data, mesh.tensor)"),
    ((8, 1, 0), "mesh.tensor=0: a mesh axis size is a positive integer or -1"),
    ((8, 1.5, 1), "mesh.fsdp=1.5: a mesh axis size is a positive integer or -1"),
])
def test_mesh_sizes_that_cannot_cover_the_devices_are_one_line_naming_the_fields(sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        sharding.make_mesh(*sizes)
    assert "\n" not in str(raised.value)


# The rule table before the 'tensor' axis existed, on a ('data', 'fsdp') mesh.
TWO_AXIS_RULES = (("embed", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"), ("conv_out", "fsdp"), ("conv_in", "fsdp"),
                  ("vocab", "fsdp"), ("time_embed", "fsdp"), ("text_time", "fsdp"), ("projection", "fsdp"),
                  ("norm", None))


@pytest.fixture(scope="module")
def sd15_sized():
    """{name: (abstract params, logical specs)} of an SD 1.5-sized UNet and text encoder: shapes only."""
    unet = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(models.SD15_UNET))
    text = nn_clip.ClipTextModel(nn_clip.ClipTextConfig.from_dict(models.SD15_TEXT))
    return {"unet": (nn_unet.abstract_params(unet), nn_unet.logical_partition_specs(unet)),
            "text_encoder": (nn_clip.abstract_params(text), nn_clip.logical_partition_specs(text))}


@pytest.mark.parametrize("data, fsdp", [(8, 1), (2, 4), (1, 8)])
def test_a_tensor_axis_of_one_shards_every_param_as_the_two_axis_mesh_did(sd15_sized, data, fsdp):
    mesh = sharding.make_mesh(data, fsdp)
    two_axis = Mesh(np.asarray(jax.devices()).reshape(data, fsdp), ("data", "fsdp"))
    for abstract, specs in sd15_sized.values():
        new = jax.tree.leaves(sharding.param_shardings(abstract, mesh, specs))
        old = jax.tree.leaves(sharding.param_shardings(abstract, two_axis, specs, TWO_AXIS_RULES))
        assert [s.spec for s in new] == [s.spec for s in old]
        assert all(n.is_equivalent_to(o, len(n.spec)) for n, o in zip(new, old))
        assert any("fsdp" in s.spec for s in new) == (fsdp > 1)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8), (4, 1, 2)])
def test_a_tensor_mesh_splits_attention_heads_and_mlp_units_and_fsdp_the_rest(sd15_sized, shape):
    mesh = sharding.make_mesh(*shape)
    fsdp = "fsdp" if shape[1] > 1 else None
    shardings = {name: traverse_util.flatten_dict(sharding.param_shardings(abstract, mesh, specs))
                 for name, (abstract, specs) in sd15_sized.items()}
    unet, text = shardings["unet"], shardings["text_encoder"]
    block = ("down_blocks_0", "attentions_0", "transformer_blocks_0")
    for attention in ("attn1", "attn2"):
        for projection in ("to_q", "to_k", "to_v"):
            assert unet[(*block, attention, projection, "kernel")].spec == P(fsdp, "tensor")
        assert unet[(*block, attention, "to_out_0", "kernel")].spec == P("tensor", fsdp)
    assert unet[(*block, "ff", "net_0", "proj", "kernel")].spec == P(fsdp, "tensor")
    assert unet[(*block, "ff", "net_2", "kernel")].spec == P("tensor", fsdp)
    # Convolutions are not split over 'tensor': sharded by 'fsdp' alone, replicated over 'tensor'.
    assert unet[("down_blocks_1", "resnets_0", "conv1", "kernel")].spec == P(None, None, None, fsdp)
    layer = ("text_model", "encoder", "layers_0")
    for projection in ("q_proj", "k_proj", "v_proj"):
        assert text[(*layer, "self_attn", projection, "kernel")].spec == P(fsdp, "tensor")
    assert text[(*layer, "self_attn", "out_proj", "kernel")].spec == P("tensor", fsdp)
    assert text[(*layer, "mlp", "fc1", "kernel")].spec == P(fsdp, "tensor")
    assert text[(*layer, "mlp", "fc2", "kernel")].spec == P("tensor", fsdp)
    assert text[("text_model", "embeddings", "token_embedding", "embedding")].spec == P(None, fsdp)


def test_a_heads_dimension_the_tensor_axis_does_not_divide_stays_whole():
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 8}
    assert sharding.spec_for(("embed", "heads"), (320, 322), mesh_shape) == P(None, None)
    assert sharding.spec_for(("embed", "heads"), (320, 320), mesh_shape) == P(None, "tensor")
    # With both axes larger than 1, an uneven heads axis leaves 'tensor' unused; 'fsdp' takes embed.
    assert sharding.spec_for(("embed", "heads"), (320, 322), {"data": 1, "fsdp": 2, "tensor": 4}) == P("fsdp", None)
