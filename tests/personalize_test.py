"""Personalization methods: the model tree, LoRA and new tokens against PyTorch diffusers'
loaders, the attention regularizer by hand, each method's trainer, stages resumed after a kill."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from configs import tiny_cpu
from checkpoint_test import Killed, die_after_saving
from gal_jax import data, export, loss_terms, personalize, sharding, train, trainer as trainer_lib

BATCH_SIZE = 4  # instance examples a step: with the class images 8 rows, one per fake device


def method_config(method: str, **train_overrides):
    config = tiny_cpu.get_config(method)
    config.train.batch_size = BATCH_SIZE
    config.train.steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    if method == "attndreambooth":
        for stage in config.train.stages.values():
            stage.batch_size, stage.steps = 8, 4  # no class images: 8 instance rows
    config.train.update(train_overrides)
    return config


@pytest.fixture(scope="module")
def loaded(loaded_default_sd):
    return loaded_default_sd


@pytest.fixture(scope="module")
def grown_sd(loaded):
    """The tiny SD whose tokenizer knows "<tiny-teapot>" (how the new-token methods' sets are written)."""
    sd, _ = loaded
    return personalize.add_new_tokens(sd, ["<tiny-teapot>"], ["teapot"])[0]


@pytest.fixture(scope="module")
def train_set(tiny_assets, grown_sd, tmp_path_factory):
    references = data.load_concept(tiny_assets["object_concept"])
    return data.write_training_set(references, data.list_class_images(tiny_assets["reg_dir"]), "a teapot",
                                   tmp_path_factory.mktemp("train_set") / "set", grown_sd.tokenize, 64)


@pytest.fixture(scope="module")
def plain_set(tiny_assets, loaded, tmp_path_factory):
    """References and class images tokenized by the base tokenizer (DreamBooth, LoRA)."""
    sd, _ = loaded
    references = data.load_concept(tiny_assets["object_concept"])
    return data.write_training_set(references, data.list_class_images(tiny_assets["reg_dir"]), "a teapot",
                                   tmp_path_factory.mktemp("plain_set") / "set", sd.tokenize, 64)


@pytest.fixture(scope="module")
def instance_set(tiny_assets, grown_sd, tmp_path_factory):
    """The references alone (AttnDreamBooth trains without prior preservation)."""
    references = data.load_concept(tiny_assets["object_concept"])
    return data.write_training_set(references, [], None, tmp_path_factory.mktemp("instance_set") / "set",
                                   grown_sd.tokenize, 64)


def make_trainer(config, loaded):
    sd, _ = loaded
    sd, method = personalize.prepare(config, sd, placeholder="<tiny-teapot>", class_word="teapot")
    return trainer_lib.Trainer(config, sd, sharding.make_mesh(), method)


# ---------------------------------------------------------------------------------------------
# The model tree


def test_split_and_merge_partition_the_tree_by_path():
    tree = {"unet": {"a": {"attn2": {"kernel": 1}}, "b": {"kernel": 2}}, "text_encoder": {"t": 3}, "new_tokens": 4}
    trained, rest = personalize.split(tree, r"^unet/.*/attn2/")
    assert trained == {"unet": {"a": {"attn2": {"kernel": 1}}}}
    assert rest == {"unet": {"b": {"kernel": 2}}, "text_encoder": {"t": 3}, "new_tokens": 4}
    assert personalize.merge(trained, rest) == tree
    with pytest.raises(personalize.MethodConfigError, match="matches no parameter"):
        personalize.split(tree, "^lora/")


def test_config_errors_name_the_field(loaded):
    config = tiny_cpu.get_config("attndreambooth")
    config.train.stages.s2_attention.stepz = 3
    with pytest.raises(personalize.MethodConfigError, match=r"train.stages.s2_attention.stepz: config.train has no"):
        personalize.stages_from_config(config)
    config = tiny_cpu.get_config()
    config.train.method = "dreamboth"
    with pytest.raises(personalize.MethodConfigError, match="config.train.method='dreamboth'"):
        personalize.stages_from_config(config)
    config = tiny_cpu.get_config("textual_inversion")
    with pytest.raises(personalize.MethodConfigError, match="placeholder ''"):
        personalize.prepare(config, None)
    config = tiny_cpu.get_config()
    config.train.loss_terms.attention_map.mean = 1.0
    with pytest.raises(ValueError, match=r"loss_terms.attention_map needs the new token of a method that adds one"):
        train.StepConfig.from_config(config.train)
    config.train.loss_terms.attention_map.mean = -1.0
    with pytest.raises(ValueError, match=r"attention_map: mean and var are weights and must be >= 0"):
        train.StepConfig.from_config(config.train, new_token_id=5)
    config = tiny_cpu.get_config()
    config.train.loss_terms.attention_mapp = dict(mean=1.0)
    with pytest.raises(ValueError, match=r"loss_terms.attention_mapp: no loss term of that name \(registered: "):
        train.StepConfig.from_config(config.train)
    config = tiny_cpu.get_config()
    config.train.loss_terms.attention_map.scale = 1.0
    with pytest.raises(ValueError, match=r"attention_map.scale: the term's settings are \['mean', 'var'\]"):
        train.StepConfig.from_config(config.train)
    config = tiny_cpu.get_config()
    config.train.attention_loss_mean = 1.0  # the field's name before the loss-term registry
    with pytest.raises(ValueError, match="now train.loss_terms.attention_map.mean"):
        train.StepConfig.from_config(config.train)
    config = tiny_cpu.get_config()
    config.lora.train_text_encoder, config.lora.text_encoder_targets = True, "nothing_here"
    config.train.method = "lora"
    sd, params = loaded
    _, method = personalize.prepare(config, sd)
    with pytest.raises(personalize.MethodConfigError, match="text_encoder_targets='nothing_here' matches no 2-D kernel of the text encoder"):
        personalize.model_tree(method, params, jax.random.key(0))


def test_stages_run_in_name_order_with_their_overrides():
    config = tiny_cpu.get_config("attndreambooth")
    config.train.loss_terms.attention_map.var = 7.0
    config.train.stages.s3_unet.loss_terms = dict(attention_map=dict(mean=3.0))
    stages = personalize.stages_from_config(config)
    assert [s.name for s in stages] == ["s1_inversion", "s2_attention", "s3_unet"]
    assert [s.train.learning_rate for s in stages] == [1e-3, 2e-5, 2e-6]
    assert [s.trainable for s in stages] == ["^new_tokens$", "^unet/.*/attn2/", "^unet/"]
    # A stage's loss-term settings are merged into config.train's: s3 keeps var from config.train.
    terms = [train.StepConfig.from_config(s.train, new_token_id=5).loss_terms for s in stages]
    assert terms == [(("attention_map", (("mean", 0.1), ("var", 0.0))),),
                     (("attention_map", (("mean", 2.0), ("var", 5.0))),),
                     (("attention_map", (("mean", 3.0), ("var", 7.0))),)]
    assert all(s.train.max_grad_norm == 0 and not s.train.with_prior for s in stages)


def test_lora_merge_is_the_base_plus_the_scaled_product(loaded):
    _, params = loaded
    spec = personalize.LoraSpec(rank=2, alpha=4.0, targets=personalize.DEFAULT_LORA_TARGETS)
    lora = personalize.init_lora(params.unet, spec.targets, spec.rank, jax.random.key(0))
    targets = personalize.lora_target_paths(params.unet, spec.targets)
    assert targets and all(p[-2] in ("to_q", "to_k", "to_v", "to_out_0") for p in targets)
    # lora_B (up) starts at zero: the merged UNet is the base.
    chex.assert_trees_all_equal(personalize.apply_lora(params.unet, lora, spec.scale), params.unet)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)
    merged = traverse_util.flatten_dict(personalize.apply_lora(params.unet, lora, spec.scale))
    base, pairs = traverse_util.flatten_dict(params.unet), personalize.lora_pairs(lora)
    for path in targets:
        pair = pairs[path[:-1]]
        np.testing.assert_allclose(merged[path], base[path] + 2.0 * pair["down"] @ pair["up"], rtol=1e-5, atol=1e-6)
    untouched = [p for p in base if p not in targets]
    assert all(merged[p] is base[p] for p in untouched)


# ---------------------------------------------------------------------------------------------
# Exports, loaded by PyTorch diffusers


def _random_lora(params, seed=0):
    """Random deltas (rank 2, alpha 4) on the UNet's default targets and the text encoder's."""
    lora = {"unet": personalize.init_lora(params.unet, personalize.DEFAULT_LORA_TARGETS, 2, jax.random.key(seed)),
            "text_encoder": personalize.init_lora(params.text_encoder, personalize.DEFAULT_TEXT_LORA_TARGETS, 2,
                                                  jax.random.key(seed))}
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    lora = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.3, lora)
    return lora, 4.0 / 2


def test_lora_file_loads_in_diffusers_and_gives_our_merged_unet(loaded, tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd, params = loaded
    lora, scale = _random_lora(params)
    result = personalize.Personalization(lora=lora, lora_scale=scale)
    folder = export.save_personalization(sd, jax.device_get(result), (), tmp_path / "p")
    assert sorted(p.name for p in folder.iterdir()) == [export.LORA_WEIGHTS]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"], safety_checker=None)
    pipe.load_lora_weights(folder)
    config = sd.unet.config
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, config.in_channels, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 77, config.cross_attention_dim)).astype(np.float32)
    t = np.array([10, 500])
    with torch.no_grad():
        expected = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
    ours = np.asarray(sd.apply_unet(result.apply(params).unet, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)))
    base = np.asarray(sd.apply_unet(params.unet, jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context)))
    assert np.abs(ours - base).max() > 1e-2, "the deltas must change the output for the test to mean anything"
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=1e-3)
    # The text encoder's deltas (diffusers' --train_text_encoder keys) load into its text encoder.
    ids = sd.tokenize(["a photo of a teapot on the beach"])
    with torch.no_grad():
        expected_text = pipe.text_encoder(torch.from_numpy(np.asarray(ids)))[0].numpy()
    ours_text = np.asarray(sd.encode_text(result.apply(params).text_encoder, jnp.asarray(ids)))
    base_text = np.asarray(sd.encode_text(params.text_encoder, jnp.asarray(ids)))
    assert np.abs(ours_text - base_text).max() > 1e-2
    np.testing.assert_allclose(ours_text, expected_text, atol=1e-4, rtol=1e-3)
    # Read back (alpha folded into lora_B): the same merged weights.
    _, again = export.load_personalization(sd, folder)
    chex.assert_trees_all_close(again.apply(params).unet, result.apply(params).unet, atol=1e-6)


def test_learned_embeddings_load_in_diffusers_and_encode_as_ours(loaded, tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd, params = loaded
    grown, new = personalize.add_new_tokens(sd, ["<tiny-teapot>"], ["teapot"])
    row = jax.random.normal(jax.random.key(3), (1, sd.text_encoder.config.hidden_size))
    result = personalize.Personalization(new_tokens=row)
    folder = export.save_personalization(grown, jax.device_get(result), new.tokens, tmp_path / "p")

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd"], safety_checker=None)
    pipe.load_textual_inversion(folder)
    prompt = "a photo of a <tiny-teapot> teapot"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert int(new.ids[0]) in ids[0].tolist()
    np.testing.assert_array_equal(ids.numpy(), grown.tokenize([prompt]))
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0].numpy()
    ours = np.asarray(grown.encode_text(result.apply(params).text_encoder, jnp.asarray(grown.tokenize([prompt]))))
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    # Read back into the base model: the tokenizer and table grow again.
    sd_again, again = export.load_personalization(sd, folder)
    assert sd_again.tokenize([prompt]).tolist() == grown.tokenize([prompt]).tolist()
    np.testing.assert_array_equal(np.asarray(again.new_tokens), np.asarray(row))


def test_bad_lora_file_is_refused_naming_the_key(loaded, tmp_path):
    from safetensors.numpy import save_file

    sd, _ = loaded
    (tmp_path / "p").mkdir()
    save_file({"unet.nowhere.to_q.lora_A.weight": np.zeros((2, 4), np.float32)},
              str(tmp_path / "p" / export.LORA_WEIGHTS))
    with pytest.raises(export.ExportError, match="unet.nowhere.to_q.lora_A.weight"):
        export.load_personalization(sd, tmp_path / "p")


# ---------------------------------------------------------------------------------------------
# The attention regularizer


def test_attention_map_loss_follows_the_authors_formula():
    rng = np.random.default_rng(0)
    probs = {name: rng.random((3, 2, 16, 6)).astype(np.float32) for name in ("a", "b")}
    ids = np.array([[1, 9, 5, 2, 0, 0], [1, 4, 9, 7, 2, 0], [1, 4, 4, 2, 0, 0]])  # token 9 is new
    loss = np.asarray(loss_terms.attention_map_loss({k: jnp.asarray(v) for k, v in probs.items()}, jnp.asarray(ids), 9,
                                               2.0, 5.0))
    expected = []
    for b, position in ((0, 1), (1, 2)):
        total = 0.0
        for p in probs.values():
            new, nxt = p[b, :, :, position].ravel(), p[b, :, :, position + 1].ravel()
            total += 2.0 * (new.mean() - nxt.mean()) ** 2 + 5.0 * (new.var(ddof=1) - nxt.var(ddof=1)) ** 2
        expected.append(total / 2)
    np.testing.assert_allclose(loss, expected + [0.0], rtol=1e-5)


def test_a_registered_loss_term_runs_in_the_step_under_accumulation(loaded, plain_set, monkeypatch):
    def instances(outputs, *, weight):  # its share of the batch: the micro-batches' values add up
        return weight * jnp.sum(1 - outputs.batch["is_prior"].astype(jnp.float32))

    monkeypatch.setitem(loss_terms.REGISTRY, "count_instances", loss_terms.LossTerm(instances, {"weight": 0.0}))
    _, params = loaded
    config = method_config("dreambooth", steps=2, log_every=1, grad_accum_steps=2)
    config.train.loss_terms.count_instances = dict(weight=0.5)
    _, metrics = make_trainer(config, loaded).train_round(params, plain_set, progress=False)
    instances = BATCH_SIZE * config.train.grad_accum_steps  # the global batch's
    for record in metrics["history"]:
        assert record["count_instances_loss"] == pytest.approx(0.5 * instances)
        parts = record["instance_loss"] + config.train.prior_loss_weight * record["prior_loss"]
        assert record["loss"] == pytest.approx(parts + 0.5 * instances, rel=1e-5)


def test_dco_judges_the_lora_models_loss_against_the_base_unet(loaded, plain_set):
    from train_test import synthetic_batch, with_randomness

    sd, params = loaded
    config = method_config("lora")
    trainer = make_trainer(config, loaded)
    trained, rest = trainer.split_for(params)
    frozen = train.place_frozen(params.vae, rest, sd, trainer.mesh)
    batch = with_randomness(sd, synthetic_batch(sd, 2))
    beta = 50.0
    dco = train.StepConfig(loss_terms=(("dco", (("beta", beta),)),), lora_scale=trainer.method.lora_scale)
    plain = train.StepConfig(lora_scale=trainer.method.lora_scale)
    run = lambda t, c: jax.jit(lambda t, b: train.dreambooth_loss(t, b, frozen, sd=sd, config=c))(t, batch)
    # lora_B starts at zero: the model is its base, DCO is -log sigmoid(0) = log 2.
    loss, parts = run(trained, dco)
    np.testing.assert_allclose(float(parts["dco_loss"]), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(loss), np.log(2.0) + float(parts["prior_loss"]), rtol=1e-6)
    # Moved deltas: the instance loss against the base UNet's on the same noisy latents.
    keys = iter(jax.random.split(jax.random.key(5), 1000))
    moved = jax.tree_util.tree_map(lambda x: jax.random.normal(next(keys), x.shape) * 0.5, trained)
    loss, parts = run(moved, dco)
    _, base_parts = run(trained, plain)
    gap = float(parts["instance_loss"]) - float(base_parts["instance_loss"])
    assert abs(beta * gap) > 0.05, "the deltas must move the loss for the test to mean anything"
    np.testing.assert_allclose(float(parts["dco_loss"]), float(-jax.nn.log_sigmoid(-beta * gap)), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(parts["dco_loss"]) + float(parts["prior_loss"]), rtol=1e-5)
    # As MuDI trains: LoRA with DCO, two accumulated micro-batches.
    config = method_config("lora", steps=2, log_every=1, grad_accum_steps=2)
    config.train.loss_terms.dco.beta = 1000.0
    result, metrics = make_trainer(config, loaded).train_round(params, plain_set, progress=False)
    for record in metrics["history"]:  # the set's class images keep their prior loss beside DCO
        assert np.isfinite(record["dco_loss"])
        assert record["loss"] == pytest.approx(record["dco_loss"] + record["prior_loss"], rel=1e-5)
    assert max(np.abs(np.asarray(p["up"])).max() for p in personalize.lora_pairs(result.lora["unet"]).values()) > 0
    # Without a base apart from what is trained there is nothing to compare with.
    dreambooth = make_trainer(method_config("dreambooth"), loaded)
    trained, rest = dreambooth.split_for(params)
    frozen = train.place_frozen(params.vae, rest, sd, dreambooth.mesh)
    with pytest.raises(ValueError, match=r"loss_terms.dco compares the model with its base UNet"):
        train.dreambooth_loss(trained, batch, frozen, sd=sd, config=dco)


# ---------------------------------------------------------------------------------------------
# Each method's trainer


def test_lora_trains_only_its_deltas_with_less_state(loaded, plain_set, train_set):
    _, params = loaded
    config = method_config("lora")
    config.lora.train_text_encoder = True
    trainer = make_trainer(config, loaded)
    with pytest.raises(ValueError, match="beyond the text encoder's"):
        trainer.train_round(params, train_set, progress=False)  # its tokenizer knew "<tiny-teapot>"
    result, metrics = trainer.train_round(params, plain_set, progress=False)
    assert result.unet is None and result.new_tokens is None and np.isfinite(metrics["loss"])
    assert sorted(result.lora) == ["text_encoder", "unet"]
    for component in result.lora.values():
        ups = [np.abs(np.asarray(p["up"])).max() for p in personalize.lora_pairs(component).values()]
        assert min(ups) > 0, "every lora_B moved from zero"
    trained, _ = trainer.split_for(params)
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(trained))
    unet_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params.unet))
    assert state_bytes < 0.2 * unet_bytes


def test_a_set_tokenized_without_the_new_token_is_refused(loaded, plain_set):
    _, params = loaded
    with pytest.raises(ValueError, match=r"holds the new token\(s\) \['<tiny-teapot>'\]"):
        make_trainer(method_config("textual_inversion"), loaded).train_round(params, plain_set, progress=False)


def test_textual_inversion_trains_only_the_new_row(loaded, train_set):
    sd, params = loaded
    trainer = make_trainer(method_config("textual_inversion"), loaded)
    result, _ = trainer.train_round(params, train_set, progress=False)
    assert result.unet is None and result.lora is None
    grown = result.apply(params)
    table = traverse_util.flatten_dict(grown.text_encoder)[("text_model", "embeddings", "token_embedding", "embedding")]
    base_table = traverse_util.flatten_dict(params.text_encoder)[("text_model", "embeddings", "token_embedding", "embedding")]
    np.testing.assert_array_equal(np.asarray(table[:-1]), np.asarray(base_table))
    init = base_table[trainer.method.new_tokens.init_ids[0]]
    assert np.abs(np.asarray(table[-1] - init)).max() > 1e-4, "the new row trained"
    assert trainer.sd.tokenize(["a <tiny-teapot> teapot"])[0, 2] == trainer.method.new_tokens.ids[0]


def _uninterrupted(loaded, instance_set, tmp_path_factory):
    trainer = make_trainer(method_config("attndreambooth"), loaded)
    return trainer, trainer.train_round(loaded[1], instance_set, tmp_path_factory.mktemp("attn") / "c",
                                        progress=False)


@pytest.fixture(scope="module")
def attndreambooth_round(loaded, instance_set, tmp_path_factory):
    return _uninterrupted(loaded, instance_set, tmp_path_factory)


def test_attndreambooth_stages_chain_and_regularize(loaded, attndreambooth_round):
    _, params = loaded
    trainer, (result, metrics) = attndreambooth_round
    assert [len(s["history"]) for s in metrics["stages"]] == [2, 2, 2]
    assert [p["step"] for p in metrics["loss_curve"]] == [2, 4, 6, 8, 10, 12] and metrics["steps"] == 12
    assert all(h["attention_map_loss"] > 0 for s in metrics["stages"] for h in s["history"])
    assert result.unet is not None and result.new_tokens is not None and result.lora is None
    # Stage 2 moved the cross-attention layers, stage 3 the rest of the UNet too.
    flat, base = traverse_util.flatten_dict(result.unet), traverse_util.flatten_dict(params.unet)
    moved = {p for p in flat if np.abs(np.asarray(flat[p]) - np.asarray(base[p])).max() > 0}
    assert any("attn2" in p for p in moved) and any("attn2" not in "/".join(p) for p in moved)


def test_attndreambooth_killed_in_stage_2_resumes_there(loaded, instance_set, attndreambooth_round, tmp_path,
                                                        monkeypatch):
    _, params = loaded
    _, (uninterrupted, _) = attndreambooth_round
    trainer = make_trainer(method_config("attndreambooth"), loaded)
    die_after_saving(monkeypatch, lambda ckpt, step: ckpt.directory.name == "s2_attention" and step == 2)
    with pytest.raises(Killed):
        trainer.train_round(params, instance_set, tmp_path / "c", progress=False)
    monkeypatch.undo()
    result, metrics = trainer.train_round(params, instance_set, tmp_path / "c", progress=False)
    first, second, _ = metrics["stages"]
    assert first["start_step"] == 4 and first["history"] == []  # finished: read back, not retrained
    assert second["start_step"] == 2
    chex.assert_trees_all_close(jax.device_get(result.new_tokens), jax.device_get(uninterrupted.new_tokens))
    chex.assert_trees_all_close(jax.device_get(result.unet), jax.device_get(uninterrupted.unet), atol=1e-6)


def test_bench_train_puts_lora_next_to_dreambooth(loaded):
    from gal_jax import bench

    sd, params = loaded
    config = method_config("lora")
    config.bench.iters, config.bench.warmup = 1, 0
    figures = bench.bench_train(config, sd, params, sharding.make_mesh())
    assert figures["method"] == "lora"
    assert figures["memory_vs_dreambooth"] < 0.9  # no AdamW moments or gradients for the frozen UNet
    assert figures["memory_vs_dreambooth"] == pytest.approx(
        figures["compiled_memory_gib"] / figures["dreambooth_compiled_memory_gib"], rel=1e-2)
    assert figures["step_s_median"] > 0 and figures["dreambooth_step_s_median"] > 0


def test_personalization_apply_keeps_the_base_for_dreambooth(loaded):
    _, params = loaded
    result = personalize.Personalization(unet=params.unet)
    applied = result.apply(params)
    assert applied.unet is params.unet and applied.text_encoder is params.text_encoder
