"""The tiny world's training code, run for a few steps on a small world (CI never retrains the
shipped models), and the pieces it is made of."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from gal_jax import models, tiny_build, tiny_train, tiny_train_io


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_train") / "models"
    report = tiny_build.train_tiny_world(out, seed=3, recipe=tiny_train.SMOKE_RECIPE, num_train=40, progress=False)
    return out, report


def test_a_smoke_build_writes_models_our_loaders_and_pytorch_read(smoke_build):
    out, report = smoke_build
    written = json.loads((out / tiny_build.REPORT_FILE).read_text())
    assert written["num_train"] + written["num_held_out"] == 40 and written["seed"] == 3
    assert np.isfinite([report.clip_loss, report.vae_loss, report.unet_loss, report.vae_scaling_factor]).all()
    assert len(report.loss_curves["unet"]) >= 1 and set(report.seconds) >= {"clip", "vae", "unet", "figures"}
    zero_shot = written["figures"]["clip_zero_shot"]
    assert {"context", "object", "colour"} <= set(zero_shot) and zero_shot["images"] == 32
    assert 0.0 <= zero_shot["context"]["judge_accuracy"] <= 1.0
    assert len(written["figures"]["base_context_following"]["per_context"]) == 18
    round_trips = written["figures"]["judge_on_vae_round_trips"]
    assert round_trips["images"] == 32 and 0.0 <= round_trips["min"] <= round_trips["accuracy"] <= 1.0
    assert "judge on the VAE's round trips of 32 held-out pictures" in report.summary()
    blurred = written["figures"]["clip_zero_shot_on_vae_round_trips"]
    assert blurred["images"] == 32 and 0.0 <= blurred["context"]["clip_accuracy"] <= 1.0
    assert "CLIP zero-shot on the VAE's round trips of them: context" in report.summary()
    # Our loaders read both folders; the text tower is the CLIP's, bit for bit.
    sd, sd_params = models.load_stable_diffusion(out / "sd")
    clip, clip_params = models.load_clip(out / "clip")
    assert sd.max_length == clip.tokenizer.model_max_length == tiny_train.SMOKE_RECIPE.max_length == 32
    assert sd.prediction_type == tiny_train.SMOKE_RECIPE.prediction_type == "v_prediction"
    text_tower = jax.tree_util.tree_leaves(clip_params["text_model"])
    np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in text_tower]),
                                  np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(sd_params.text_encoder)]))
    # PyTorch reads them as users' downloaded models.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(out / "sd", safety_checker=None, requires_safety_checker=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(report.vae_scaling_factor, rel=1e-6)
    assert CLIPModel.from_pretrained(out / "clip").config.projection_dim == tiny_train.SMOKE_RECIPE.projection_dim


def test_the_summary_names_every_figure(smoke_build):
    summary = smoke_build[1].summary()
    for words in ("CLIP:", "VAE:", "PSNR", "UNet:", "zero-shot", "judge agrees", "base SD draws", "time:", "size:"):
        assert words in summary


def test_contrastive_loss_does_not_push_apart_equal_captions():
    eye = jnp.eye(4)
    together = jnp.stack([eye[0], eye[0], eye[2], eye[3]])  # examples 0 and 1 share one caption
    apart = together.at[1].set(jnp.array([0.8, 0.6, 0.0, 0.0]))  # example 1 moved off example 0
    scale = jnp.log(100.0)

    def loss(embeddings, groups):
        return float(tiny_train.contrastive_loss(embeddings, embeddings, scale, jnp.asarray(groups)))

    # As distinct captions, moving the pair apart pays; as one caption group, it does not.
    assert loss(apart, [0, 1, 2, 3]) < loss(together, [0, 1, 2, 3])
    assert loss(apart, [0, 0, 2, 3]) > loss(together, [0, 0, 2, 3])
    assert loss(eye, [0, 1, 2, 3]) < 1e-3


def test_hard_negatives_cost_only_when_an_image_is_closer_to_them_than_to_its_caption():
    eye = jnp.eye(4)
    scale, groups = jnp.log(100.0), jnp.arange(4)
    base = float(tiny_train.contrastive_loss(eye, eye, scale, groups))
    far = jnp.broadcast_to(-eye[:, None, :], (4, 2, 4))  # opposite each image: free
    near = jnp.broadcast_to(eye[:, None, :], (4, 2, 4))  # equal to each image's caption: costs log 3
    assert float(tiny_train.contrastive_loss(eye, eye, scale, groups, far)) == pytest.approx(base, abs=1e-6)
    # Only the image-to-text half sees them: (log 3 + 0) / 2.
    assert float(tiny_train.contrastive_loss(eye, eye, scale, groups, near)) == pytest.approx(np.log(3) / 2, abs=1e-3)


def test_trimming_padding_changes_no_text_embedding(tmp_path):
    recipe = tiny_train.SMOKE_RECIPE
    model, params = tiny_train.init_clip(recipe, seed=0)
    _, captions = tiny_train.world_dataset(8, seed=0)
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(tmp_path / "tok", recipe.max_length))
    ids = tiny_train_io.tokenize_captions(tokenizer, captions)
    longer = tiny_train_io.tokenize_captions(tokenizer, ["a dotted yellow sks flower next to a volcano in watercolor painting style"])
    trimmed, trimmed_longer = tiny_train.trim_padding(ids, longer, eos_token_id=int(recipe.text["eos_token_id"]))
    assert trimmed.shape[1] == trimmed_longer.shape[1] == 1 + int(np.argmax(longer[0] == recipe.text["eos_token_id"]))
    assert trimmed.shape[1] < ids.shape[1]
    np.testing.assert_allclose(tiny_train.text_features(model, params, jnp.asarray(trimmed)),
                               tiny_train.text_features(model, params, jnp.asarray(ids)), atol=1e-5)


def test_the_vae_of_another_build_is_taken_only_if_it_matches_the_recipe(smoke_build, tmp_path):
    out, _ = smoke_build
    assert tiny_build._checked_vae_folder(out / "sd", tiny_train.SMOKE_RECIPE) == out / "sd" / "vae"
    with pytest.raises(ValueError, match="differs from the recipe's in block_out_channels"):
        tiny_build._checked_vae_folder(out / "sd", tiny_train.DEFAULT_RECIPE)
    with pytest.raises(ValueError, match="not found"):
        tiny_build._checked_vae_folder(tmp_path, tiny_train.SMOKE_RECIPE)


def test_a_build_with_swap_negatives_and_vae_from_keeps_that_vae_byte_for_byte(smoke_build, tmp_path):
    source, _ = smoke_build
    recipe = dataclasses.replace(tiny_train.SMOKE_RECIPE, clip_object_negatives=True, clip_colour_negatives=True)
    report = tiny_build.train_tiny_world(tmp_path / "models", seed=4, recipe=recipe, num_train=40,
                                         progress=False, vae_from=source / "sd")
    assert np.isfinite(report.clip_loss) and report.vae_from == str(source / "sd" / "vae")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "models" / "sd" / "vae" / name).read_bytes() == (source / "sd" / "vae" / name).read_bytes()
    assert "vae" not in report.seconds and np.isnan(report.vae_loss)
    assert "VAE: not trained" in report.summary()


def test_a_build_with_clip_from_keeps_that_clip_and_its_text_tower_byte_for_byte(smoke_build, tmp_path):
    source, _ = smoke_build
    recipe = dataclasses.replace(tiny_train.SMOKE_RECIPE, clip_twins=("object",))  # twins unused: nothing drawn
    report = tiny_build.train_tiny_world(tmp_path / "models", seed=5, recipe=recipe, num_train=40, progress=False,
                                         vae_from=source / "sd", clip_from=source / "clip")
    out = tmp_path / "models"
    assert report.clip_from == str(source / "clip") and np.isnan(report.clip_loss) and "clip" not in report.seconds
    assert "CLIP: not trained" in report.summary() and np.isfinite(report.unet_loss)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.json"):
        assert (out / "clip" / name).read_bytes() == (source / "clip" / name).read_bytes()
    # SD's text encoder is that CLIP's text tower, as in the build that trained it.
    for name in ("config.json", "model.safetensors"):
        assert (out / "sd" / "text_encoder" / name).read_bytes() == (source / "sd" / "text_encoder" / name).read_bytes()
    assert np.isfinite(report.figures["clip_zero_shot"]["context"]["clip_accuracy"])


def test_the_clip_of_another_build_is_taken_only_if_its_text_tower_is_the_recipes(smoke_build, tmp_path):
    source, _ = smoke_build
    assert tiny_build._checked_clip_folder(source / "clip", tiny_train.SMOKE_RECIPE) == source / "clip"
    with pytest.raises(ValueError, match="text tower differs from the recipe's in hidden_size, intermediate_size, "
                                         "num_hidden_layers"):
        tiny_build._checked_clip_folder(source / "clip", tiny_train.DEFAULT_RECIPE)
    with pytest.raises(ValueError, match="config.json: not found; --clip_from must be a CLIP folder"):
        tiny_build._checked_clip_folder(tmp_path, tiny_train.SMOKE_RECIPE)
    with pytest.raises(ValueError, match="not a CLIPModel config"):
        tiny_build._checked_clip_folder(source / "sd" / "text_encoder", tiny_train.SMOKE_RECIPE)
    copy = tmp_path / "clip"
    shutil.copytree(source / "clip", copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=77)))
    with pytest.raises(ValueError, match="pads to 77 tokens, the recipe's to 32"):
        tiny_build._checked_clip_folder(copy, tiny_train.SMOKE_RECIPE)
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="tokenizer_config.json: not found"):
        tiny_build._checked_clip_folder(copy, tiny_train.SMOKE_RECIPE)


def test_hard_negatives_are_the_recipes_object_then_colour_swaps():
    from gal_jax import tiny_world

    captions = ["a red cup on the beach", "a striped blue sks cat in library"]
    assert tiny_build.hard_negatives(captions, tiny_train.DEFAULT_RECIPE) is None
    objects = tiny_build.hard_negatives(captions, tiny_train.OBJECT_NEGATIVES_RECIPE)
    assert objects == [tiny_world.object_swaps(c) for c in captions]
    both = tiny_build.hard_negatives(captions, tiny_train.RECIPES["swap_negatives"])
    assert both == [tiny_world.object_swaps(c) + tiny_world.colour_swaps(c) for c in captions]
    assert {len(n) for n in both} == {len(tiny_world.OBJECTS) - 1 + len(tiny_world.COLOURS) - 1}


def test_the_cli_offers_exactly_the_recipes():
    from gal_jax import main

    assert sorted(main._RECIPE._flagvalues[main._RECIPE.name].parser.enum_values) == sorted(tiny_train.RECIPES)


def test_each_epoch_visits_every_example_once():
    key = jax.random.key(0)
    epoch = np.concatenate([np.asarray(tiny_train.epoch_batch_indices(key, jnp.int32(s), 12, 4)) for s in range(3)])
    assert sorted(epoch) == list(range(12))
    next_epoch = np.concatenate([np.asarray(tiny_train.epoch_batch_indices(key, jnp.int32(s), 12, 4)) for s in range(3, 6)])
    assert sorted(next_epoch) == list(range(12)) and not np.array_equal(epoch, next_epoch)


def test_caption_groups_and_held_out_split():
    assert tiny_train.caption_groups(["a", "b", "a"]).tolist() == [0, 1, 0]
    train, held = tiny_train.split_held_out(50, 0.1, seed=0)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 50


def test_the_saved_vae_matches_pytorch_numerically(tmp_path):
    from diffusers import AutoencoderKL

    recipe = tiny_train.SMOKE_RECIPE
    vae, params = tiny_train.init_vae(recipe, seed=0)
    tiny_train_io.save_vae(tmp_path / "vae", dict(recipe.vae), params, scaling_factor=0.5, dtype="float32")
    torch_vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert torch_vae.config.scaling_factor == 0.5
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    _, decoded = tiny_train._encode_decode(vae, params, jnp.asarray(images))
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    with torch.no_grad():
        expected = torch_vae.decode(torch_vae.encode(pixels).latent_dist.mean).sample.numpy()
    np.testing.assert_allclose(np.asarray(decoded).transpose(0, 3, 1, 2), expected, atol=2e-3, rtol=2e-3)


def test_the_random_unet_folder_loads_in_pytorch_and_in_ours(tmp_path):
    from diffusers import UNet2DConditionModel

    recipe = tiny_train.SMOKE_RECIPE
    tiny_train_io.save_random_unet(tmp_path / "unet", dict(recipe.unet), seed=3)
    torch_unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert tuple(torch_unet.config.block_out_channels) == tuple(recipe.unet["block_out_channels"])
    params = models.load_unet_params(tmp_path / "unet")
    stored = traverse_util.flatten_dict(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in stored.values())
    assert any(float(np.abs(np.asarray(v)).max()) > 0 for k, v in stored.items() if k[-1] == "kernel")


def test_bad_training_images_are_named():
    recipe = tiny_train.SMOKE_RECIPE
    with pytest.raises(ValueError, match="uint8"):
        tiny_build._checked_images(np.zeros((4, 32, 32, 3), np.uint8), ["a"] * 4, recipe)
    with pytest.raises(ValueError, match="3 captions"):
        tiny_build._checked_images(np.zeros((4, 64, 64, 3), np.uint8), ["a"] * 3, recipe)


def test_a_caption_longer_than_the_text_tower_is_refused(tmp_path):
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(tmp_path / "tok", 8))
    with pytest.raises(ValueError, match="longer than"):
        tiny_train_io.tokenize_captions(tokenizer, ["a striped yellow flower next to a volcano in watercolor style"])


def test_the_locked_stage_leaves_the_text_tower_exactly_as_it_was(tmp_path):
    recipe = tiny_train.SMOKE_RECIPE
    model, params = tiny_train.init_clip(recipe, seed=0)
    images, captions = tiny_train.world_dataset(16, seed=0)
    tokenizer_dir = tiny_train_io.write_tokenizer(tmp_path / "tokenizer", recipe.max_length)
    ids = tiny_train_io.tokenize_captions(tiny_train_io.load_tokenizer(tokenizer_dir), captions)
    data = tiny_train.ClipData(jnp.asarray(images), jnp.asarray(ids), jnp.asarray(tiny_train.caption_groups(captions)))
    trained, _ = tiny_train.train_clip(model, params, data, recipe.clip_locked_schedule, 0, False, locked_text=True)
    for part in ("text_model", "text_projection", "vision_model"):
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                             params[part], trained[part]))
        assert same == (part == "text_model"), part


def test_the_identifier_term_pulls_a_caption_and_its_plain_form_together(tmp_path):
    recipe = dataclasses.replace(
        tiny_train.SMOKE_RECIPE,
        clip_schedule=tiny_train.Schedule(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=1))
    model, params = tiny_train.init_clip(recipe, seed=0)
    images, plain = tiny_train.world_dataset(8, seed=0)
    captions = ["a sks " + c.removeprefix("a ") for c in plain]
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(tmp_path / "tok", recipe.max_length))
    ids, plain_ids = (jnp.asarray(tiny_train_io.tokenize_captions(tokenizer, c)) for c in (captions, plain))
    groups = jnp.asarray(tiny_train.caption_groups(captions))

    def distance(p):
        _, text = tiny_train.clip_embeddings(model, p, jnp.asarray(images), ids)
        _, plain_text = tiny_train.clip_embeddings(model, p, jnp.asarray(images), plain_ids)
        return float(tiny_train.identifier_loss(text, plain_text))

    with_term = tiny_train.ClipData(jnp.asarray(images), ids, groups, plain_ids)
    without_term = tiny_train.ClipData(jnp.asarray(images), ids, groups)
    pulled, _ = tiny_train.train_clip(model, params, with_term, recipe.clip_schedule, 0, False)
    free, _ = tiny_train.train_clip(model, params, without_term, recipe.clip_schedule, 0, False)
    assert distance(pulled) < 0.5 * distance(free)


def test_joint_vision_trains_a_scaffold_then_a_fresh_vision_tower_against_the_locked_text_tower(monkeypatch, tmp_path):
    """A recipe with joint_vision: the joint stage trains its small vision tower with the text
    tower; the locked stage gets the recipe's `vision` tower, freshly initialised, and the joint
    stage's text tower, text projection and logit scale."""
    recipe = dataclasses.replace(
        tiny_train.SMOKE_RECIPE, joint_vision=tiny_train.SMOKE_RECIPE.vision,
        vision=dict(tiny_train.SMOKE_RECIPE.vision, hidden_size=48, num_hidden_layers=2))
    stages = []
    real_train_clip = tiny_build.train_clip

    def recorded(model, params, *args, **kwargs):
        trained, losses = real_train_clip(model, params, *args, **kwargs)
        stages.append((model, params, trained, kwargs.get("locked_text", False)))
        return trained, losses

    monkeypatch.setattr(tiny_build, "train_clip", recorded)
    images, captions = tiny_train.world_dataset(24, seed=0)
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(tmp_path / "tok", recipe.max_length))
    ids = tiny_train_io.tokenize_captions(tokenizer, captions)
    report = tiny_build.BuildReport(seed=0, num_train=16, num_held_out=8)
    model, params = tiny_build._build_clip(report, images, ids, tiny_train.caption_groups(captions),
                                           np.arange(16), np.arange(16, 24), recipe, 0, False)
    (joint_model, _, joint, joint_locked), (locked_model, start, final, locked) = stages
    assert (joint_locked, locked) == (False, True) and model is locked_model
    assert joint_model.config.vision.hidden_size == 32 and model.config.vision.hidden_size == 48
    assert len(jax.tree_util.tree_leaves(final["vision_model"])) > len(jax.tree_util.tree_leaves(joint["vision_model"]))
    for part in ("text_model", "text_projection", "logit_scale"):
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(jnp.array_equal(a, b)), start[part], joint[part])), part
    fresh = tiny_train.init_clip(recipe, 50)[1]  # _build_clip seeds the fresh tower with seed + 50
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), start["vision_model"], fresh["vision_model"]))
    assert np.isfinite(report.clip_held_out_accuracy)


def test_joint_vision_needs_a_locked_stage():
    with pytest.raises(ValueError, match="joint_vision needs clip_locked_schedule"):
        dataclasses.replace(tiny_train.SMOKE_RECIPE, joint_vision=tiny_train.SMOKE_RECIPE.vision,
                            clip_locked_schedule=None)


def _twin_data(tmp_path, count: int, recipe=tiny_train.SMOKE_RECIPE):
    """Returns (ClipData with twins, its captions, its twin captions) of a small world."""
    images, captions = tiny_train.world_dataset(count, seed=0)
    twin_images, twin_captions = tiny_train.world_twins(count, 0, ("object", "colour"))
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(tmp_path / "tok", recipe.max_length))
    ids, twin_ids = (jnp.asarray(tiny_train_io.tokenize_captions(tokenizer, c)) for c in (captions, twin_captions))
    groups = tiny_train.caption_groups(captions + twin_captions)
    data = tiny_train.ClipData(jnp.asarray(images), ids, jnp.asarray(groups[:count]), twin_images=jnp.asarray(twin_images),
                               twin_ids=twin_ids, twin_groups=jnp.asarray(groups[count:]))
    return data, captions, twin_captions


def test_with_twins_each_drawn_picture_meets_its_twin_in_the_batch(tmp_path):
    """The step's loss is CLIP's loss over the drawn half of the batch and the twins of the same
    rows, not over a batch of drawn pictures only."""
    recipe = tiny_train.SMOKE_RECIPE
    model, params = tiny_train.init_clip(recipe, seed=0)
    data, _, _ = _twin_data(tmp_path, 16)
    optimizer = tiny_train.clip_optimizer(recipe.clip_schedule)
    state = tiny_train._new_state(params, optimizer)
    key = jax.random.key(7)
    _, metrics = tiny_train.clip_train_step(state, data, key, model=model, optimizer=optimizer, batch_size=8)
    rows = tiny_train.epoch_batch_indices(key, jnp.int32(0), 16, 4)
    image, text = tiny_train.clip_embeddings(model, params, jnp.concatenate([data.images[rows], data.twin_images[rows]]),
                                             jnp.concatenate([data.input_ids[rows], data.twin_ids[rows]]))
    groups = jnp.concatenate([data.groups[rows], data.twin_groups[rows]])
    expected = tiny_train.contrastive_loss(image, text, params["logit_scale"], groups)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="even batch size"):
        tiny_train.train_clip(model, params, data, dataclasses.replace(recipe.clip_schedule, batch_size=7), 0, False)


def test_a_build_with_twins_gives_clip_the_twins_of_its_training_rows(monkeypatch, tmp_path):
    recipe = dataclasses.replace(tiny_train.SMOKE_RECIPE, clip_twins=("object", "colour"))
    seen = []
    real_train_clip = tiny_build.train_clip

    def recorded(model, params, clip_data, *args, **kwargs):
        seen.append(clip_data)
        return real_train_clip(model, params, clip_data, *args, **kwargs)

    monkeypatch.setattr(tiny_build, "train_clip", recorded)
    data, captions, twin_captions = _twin_data(tmp_path, 24)
    ids = tiny_train_io.tokenize_captions(tiny_train_io.load_tokenizer(tmp_path / "tok"), captions)
    twin_ids = tiny_train_io.tokenize_captions(tiny_train_io.load_tokenizer(tmp_path / "tok"), twin_captions)
    train_rows = np.arange(4, 24)
    report = tiny_build.BuildReport(seed=0, num_train=20, num_held_out=4)
    tiny_build._build_clip(report, np.asarray(data.images), ids, np.asarray(data.groups), train_rows, np.arange(4),
                           recipe, 0, False,
                           twins=(np.asarray(data.twin_images), twin_ids, np.asarray(data.twin_groups), None))
    assert len(seen) == 2  # the joint and the locked stage both see the pairs
    for clip_data in seen:
        np.testing.assert_array_equal(clip_data.twin_images, np.asarray(data.twin_images)[train_rows])
        np.testing.assert_array_equal(clip_data.twin_groups, np.asarray(data.twin_groups)[train_rows])
        assert clip_data.twin_ids.shape == clip_data.input_ids.shape  # trimmed to one length
    # A twin's caption shares a group with an equal caption of the set, and only with one.
    for twin, group in zip(twin_captions, np.asarray(data.twin_groups)):
        assert [c for c, g in zip(captions, np.asarray(data.groups)) if g == group] == [c for c in captions if c == twin]


def test_train_tiny_world_hands_the_recipes_twins_to_the_build(monkeypatch, tmp_path):
    calls = {}

    def build(out, images, captions, **kwargs):
        calls.update(kwargs, images=images, captions=captions)
        raise RuntimeError("stop here")

    monkeypatch.setattr(tiny_build, "build_trained_tiny", build)
    recipe = dataclasses.replace(tiny_train.SMOKE_RECIPE, clip_twins=("object",))
    with pytest.raises(RuntimeError, match="stop here"):
        tiny_build.train_tiny_world(tmp_path, seed=2, recipe=recipe, num_train=12, progress=False)
    twin_images, twin_captions, twin_negatives = calls["twins"]
    expected_images, expected_captions = tiny_train.world_twins(12, 2, ("object",))
    assert twin_captions == expected_captions and np.array_equal(twin_images, expected_images)
    assert calls["negative_captions"] is None and twin_negatives is None
    swapping = dataclasses.replace(recipe, clip_object_negatives=True)
    with pytest.raises(RuntimeError, match="stop here"):
        tiny_build.train_tiny_world(tmp_path, seed=2, recipe=swapping, num_train=12, progress=False)
    assert calls["twins"].negative_captions == tiny_build.hard_negatives(expected_captions, swapping)
    with pytest.raises(RuntimeError, match="stop here"):
        tiny_build.train_tiny_world(tmp_path, seed=2, recipe=tiny_train.SMOKE_RECIPE, num_train=12, progress=False)
    assert calls["twins"] is None


def test_with_twins_and_caption_negatives_every_image_of_the_batch_meets_its_own(tmp_path):
    recipe = tiny_train.SMOKE_RECIPE
    model, params = tiny_train.init_clip(recipe, seed=0)
    data, captions, twin_captions = _twin_data(tmp_path, 16)
    tokenizer = tiny_train_io.load_tokenizer(tmp_path / "tok")
    swaps = tiny_train.RECIPES["swap_negatives"]

    def negative_ids(texts):
        rows = tiny_build.hard_negatives(texts, swaps)
        return jnp.asarray(tiny_train_io.tokenize_captions(tokenizer, [n for row in rows for n in row])).reshape(
            len(texts), len(rows[0]), -1)

    with pytest.raises(ValueError, match="the twins need theirs too"):
        dataclasses.replace(data, negative_ids=negative_ids(captions))
    data = dataclasses.replace(data, negative_ids=negative_ids(captions), twin_negative_ids=negative_ids(twin_captions))
    optimizer = tiny_train.clip_optimizer(recipe.clip_schedule)
    key = jax.random.key(3)
    _, metrics = tiny_train.clip_train_step(tiny_train._new_state(params, optimizer), data, key, model=model,
                                            optimizer=optimizer, batch_size=8)
    rows = tiny_train.epoch_batch_indices(key, jnp.int32(0), 16, 4)
    image, text = tiny_train.clip_embeddings(model, params, jnp.concatenate([data.images[rows], data.twin_images[rows]]),
                                             jnp.concatenate([data.input_ids[rows], data.twin_ids[rows]]))
    negatives = jnp.concatenate([data.negative_ids[rows], data.twin_negative_ids[rows]])
    negative_text = tiny_train.text_features(model, params, negatives.reshape(-1, negatives.shape[-1]))
    groups = jnp.concatenate([data.groups[rows], data.twin_groups[rows]])
    expected = tiny_train.contrastive_loss(image, text, params["logit_scale"], groups,
                                           negative_text.reshape(*negatives.shape[:2], -1))
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert tiny_train.RECIPES["twin_lit"].clip_twins == ("object", "colour")
    wide = tiny_train.RECIPES["twin_swap_wide"]
    assert wide.clip_twins and wide.clip_object_negatives and wide.clip_colour_negatives and wide.joint_vision is None


def test_a_build_refuses_caption_negatives_for_the_pictures_but_not_their_twins(tmp_path):
    images, captions = tiny_train.world_dataset(8, seed=0)
    twin_images, twin_captions = tiny_train.world_twins(8, 0, ("object",))
    with pytest.raises(ValueError, match="for both the pictures and their twins, or for neither"):
        tiny_build.build_trained_tiny(tmp_path, images, captions, recipe=tiny_train.SMOKE_RECIPE, progress=False,
                                      negative_captions=[tiny_world_swaps(c) for c in captions],
                                      twins=tiny_build.Twins(twin_images, twin_captions))
    assert not (tmp_path / "clip").exists()


def tiny_world_swaps(caption):
    from gal_jax import tiny_world

    return tiny_world.object_swaps(caption)
