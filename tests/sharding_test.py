"""Parameter shardings from logical axis names: the rule table, uneven axes, optimizer states."""

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from gal_jax import models, sharding, train
from gal_jax.nn import unet as nn_unet

MESH_SHAPE = {"data": 2, "fsdp": 4}


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
    assert sharding.spec_for(("embed", "mlp"), (256, 1024), {"data": 8, "fsdp": 1}, rules) == P(None, None)


def test_bad_rules_are_refused_naming_the_rule():
    assert sharding.logical_rules(None) == sharding.DEFAULT_LOGICAL_RULES
    assert sharding.logical_rules([["embed", "data"]]) == (("embed", "data"),)
    with pytest.raises(ValueError, match=r"mesh.rules: \('embed', 'tensor'\) is not a"):
        sharding.logical_rules((("embed", "tensor"),))
    with pytest.raises(ValueError, match="mesh.rules: 'embed' is not a"):
        sharding.logical_rules(("embed",))
    with pytest.raises(ValueError, match="the mesh has no axis 'fsdp'"):
        sharding.spec_for(("embed",), (1 << 16,), {"data": 8}, (("embed", "fsdp"),))
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


def test_facade_loads_every_weight_straight_onto_its_sharding(tiny_models, loaded_sd):
    """load_stable_diffusion(mesh=...) puts each array where the trainer lays it out, with the
    values of an unsharded load, and no array is first gathered on one device."""
    sd, params = loaded_sd
    mesh = sharding.make_mesh(1, 8)
    with jax.transfer_guard("disallow"):  # only the explicit per-shard copies of the reader
        _, placed = models.load_stable_diffusion(tiny_models["sd"], mesh=mesh)
    axes = sd.logical_axes()
    sharded = 0
    for component in ("unet", "vae", "text_encoder"):
        expected = sharding.param_shardings(getattr(params, component), mesh, getattr(axes, component))
        got, want = getattr(placed, component), getattr(params, component)
        for path, leaf in traverse_util.flatten_dict(got).items():
            assert leaf.sharding == traverse_util.flatten_dict(expected)[path], (component, path)
            sharded += "fsdp" in leaf.sharding.spec
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(traverse_util.flatten_dict(want)[path]))
    assert sharded >= 10
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
