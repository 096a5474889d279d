"""MuDI inside the loop: the multi-subject concept, Seg-Mix in the grain pipeline, the masked loss
in the step, and generation from mean-shifted noise (the tiny two-subject concept)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from configs import tiny_cpu
from gal_jax import concept as concept_lib
from gal_jax import data, models, multi_subject, personalize, sample, sharding


@pytest.fixture(scope="module")
def loaded(tiny_assets):
    return models.load_stable_diffusion(tiny_assets["sd"])


@pytest.fixture(scope="module")
def mudi_concept(tiny_assets):
    config = tiny_cpu.get_config("mudi")
    return concept_lib.load_concept(config, tiny_assets["multi_subject_concept"], None)


@pytest.fixture(scope="module")
def mudi_set(mudi_concept, loaded, tmp_path_factory):
    """The two subjects' six masked images and one GAL-queried image without a mask."""
    sd, _ = loaded
    queried = data.Reference(mudi_concept.references[0].image, "a queried image", None, 0.5, "round-1")
    return data.write_training_set(list(mudi_concept.references) + [queried], [], None,
                                   tmp_path_factory.mktemp("mudi") / "set", sd.tokenize, 64,
                                   subjects=mudi_concept.subjects)


def test_a_mudi_folder_is_a_multi_subject_concept(mudi_concept):
    assert mudi_concept.subjects == {"a": "<tiny-teapot> teapot", "b": "<tiny-cat> cat"}
    assert mudi_concept.concept_file == "metadata.jsonl"
    assert mudi_concept.phrase == "<tiny-teapot> teapot and <tiny-cat> cat"
    assert mudi_concept.anchor_prompts[0].count("<tiny-teapot> teapot and <tiny-cat> cat") == 1
    # The oracle's plain prompts lose the identifiers: "<tiny-cat> cat" -> "cat".
    assert "a photo of a cat on the grass" in mudi_concept.plain_prompts
    assert not any("<tiny" in p for p in mudi_concept.plain_prompts)
    assert mudi_concept.class_prompt == "a photo of a teapot and a cat"
    assert {r.subject for r in mudi_concept.references} == {"a", "b"}
    assert all(r.mask is not None and r.mask.is_file() for r in mudi_concept.references)


def test_mudi_needs_a_multi_subject_folder_and_segmix_too(tiny_assets):
    with pytest.raises(ValueError, match="trains several subjects at once.*metadata.jsonl"):
        concept_lib.load_concept(tiny_cpu.get_config("mudi"), tiny_assets["object_concept"], None)
    config = tiny_cpu.get_config()
    config.data.segmix.prob = 0.3
    with pytest.raises(ValueError, match=r"data.segmix.prob=0.3 mixes the subjects.*no metadata.jsonl"):
        concept_lib.load_concept(config, tiny_assets["object_concept"], None)
    config = tiny_cpu.get_config()
    config.data.placeholder = "<x>"
    with pytest.raises(ValueError, match="takes its subjects from the file's first line"):
        concept_lib.load_concept(config, tiny_assets["multi_subject_concept"], None)


def test_the_identifier_phrases_are_replaced_by_their_classes():
    phrases = {"a": "olis harry potter toy", "b": "hta corgi"}
    classes = {s: multi_subject.class_of(p) for s, p in phrases.items()}
    assert classes == {"a": "harry potter toy", "b": "corgi"}
    text = "A photo of a Olis harry potter toy and a hta corgi on a desk."
    assert multi_subject.replace_phrases(text, phrases, classes) == "A photo of a harry potter toy and a corgi on a desk."
    assert multi_subject.joined(["x", "y", "z"]) == "x, y and z"


def _batches(train_set, *, segmix, seed=0, batch=7, count=1, start=None):
    iterator = data.make_train_iterator(train_set, global_batch_size=batch, seed=seed, resolution=64,
                                        segmix=segmix, latent_size=8)
    if start is not None:
        iterator.set_state(start)
    return iterator, [next(iterator) for _ in range(count)]


def test_segmix_mixes_masked_instances_with_their_caption_and_mask(mudi_set, loaded):
    sd, _ = loaded
    _, (batch,) = _batches(mudi_set, segmix=data.SegMix(1.0, soft_alpha=0.25))
    assert batch["loss_mask"].shape == (7, 8, 8)
    captions = {
        tuple(sd.tokenize([multi_subject.SEGMIX_CAPTION.format(a, b)])[0])
        for a in ("<tiny-teapot> teapot", "<tiny-cat> cat") for b in ("<tiny-teapot> teapot", "<tiny-cat> cat") if a != b}
    mixed = [tuple(ids) in captions for ids in batch["input_ids"]]
    # Every masked image is mixed; the queried one (no mask) never is.
    assert sum(mixed) == 6
    for row, is_mixed in enumerate(mixed):
        mask = batch["loss_mask"][row]
        if is_mixed:  # soft_alpha 0.25: the background weighs 0.25, the subjects up to 1
            assert mask.min() == pytest.approx(0.25) and mask.max() > 0.75
            # White canvas around the pasted subjects.
            assert (batch["pixel_values"][row] == 1.0).all(axis=-1).mean() > 0.3
        else:
            np.testing.assert_array_equal(mask, 1.0)


def test_segmix_waits_for_its_start_step_and_resumes_exactly(mudi_set):
    # 7 records per step: steps 0 and 1 are plain, from step 2 on every masked image is mixed.
    iterator, batches = _batches(mudi_set, segmix=data.SegMix(1.0, start_step=2, soft_alpha=0.0), count=3)
    assert [int((b["loss_mask"] < 1).any(axis=(1, 2)).sum()) for b in batches] == [0, 0, 6]
    stopped, _ = _batches(mudi_set, segmix=data.SegMix(1.0, start_step=2, soft_alpha=0.0), count=2)
    _, (again,) = _batches(mudi_set, segmix=data.SegMix(1.0, start_step=2, soft_alpha=0.0), start=stopped.get_state())
    for key in batches[2]:
        np.testing.assert_array_equal(again[key], batches[2][key])


def test_segmix_probability_holds_and_a_seed_repeats(mudi_set):
    _, batches = _batches(mudi_set, segmix=data.SegMix(0.3, soft_alpha=0.0), count=60)
    rate = np.mean([(b["loss_mask"][b["weight"] == 1.0] < 1).any(axis=(1, 2)).mean() for b in batches])
    assert rate == pytest.approx(0.3, abs=0.06)
    _, repeat = _batches(mudi_set, segmix=data.SegMix(0.3, soft_alpha=0.0), count=3)
    for first, second in zip(batches, repeat):
        np.testing.assert_array_equal(first["pixel_values"], second["pixel_values"])


def test_segmix_settings_are_checked(tiny_assets, loaded, tmp_path):
    with pytest.raises(ValueError, match=r"data.segmix.prob=1.5 must lie in \[0, 1\]"):
        data.SegMix(1.5)
    with pytest.raises(ValueError, match=r"soft_alpha=2.0"):
        data.SegMix(0.3, soft_alpha=2.0)
    sd, _ = loaded
    plain = data.write_training_set(data.load_concept(tiny_assets["object_concept"]), [], None, tmp_path / "set",
                                    sd.tokenize, 64)
    with pytest.raises(ValueError, match="needs a multi-subject set"):
        _batches(plain, segmix=data.SegMix(0.3))


def test_an_all_ones_mask_is_the_plain_loss_in_the_trainer_with_segmix(tiny_assets, loaded, mudi_set):
    """The trainer with Seg-Mix at probability 0 feeds all-ones masks: the same loss as without."""
    from gal_jax import trainer as trainer_lib

    sd, params = loaded
    mesh = sharding.make_mesh()
    losses = []
    for prob in (0.0, 1e-9):  # 1e-9: Seg-Mix on (masks in the batch), never mixing in practice
        config = tiny_cpu.get_config("mudi")
        config.train.steps, config.train.batch_size, config.train.grad_accum_steps = 2, 8, 1
        config.train.loss_terms.dco.beta = 0.0
        config.data.segmix.prob = prob
        trainer = trainer_lib.Trainer(config, sd, mesh)
        assert trainer.cache_latents == (prob == 0.0)
        _, metrics = trainer.train_round(params, mudi_set, progress=False)
        losses.append(metrics["loss_curve"][-1]["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_mean_shifted_noise_starts_from_the_collage(loaded):
    sd, params = loaded
    mesh = sharding.make_mesh()
    generator = sample.Generator(sd, mesh, sampler="ddim", steps=2, max_images_per_device=1)
    collage = np.zeros((8, 64, 64, 3), np.uint8)
    collage[:, :, :32] = 255

    def run(**init):
        return np.asarray(generator.generate(params, ["a teapot", "a cat"], [0, 1], 1, 4, 0, progress=False, **init))

    plain = run()
    np.testing.assert_array_equal(run(init_images=collage, init_gamma=0.0), plain)  # gamma 0: plain noise
    shifted = run(init_images=collage, init_gamma=3.0)
    assert not np.array_equal(shifted, plain)
    np.testing.assert_array_equal(run(init_images=collage, init_gamma=3.0), shifted)  # seeded
    with pytest.raises(ValueError, match=r"init_images must be uint8 \(8, 64, 64, 3\)"):
        run(init_images=collage[:3], init_gamma=1.0)


def test_the_collage_holds_every_subject_on_white(mudi_concept):
    segments = [[multi_subject.load_segment(r.image, r.mask, 64) for r in mudi_concept.references if r.subject == s]
                for s in mudi_concept.subjects]
    image = multi_subject.subjects_collage(segments, np.random.default_rng(0), 64)
    again = multi_subject.subjects_collage(segments, np.random.default_rng(0), 64)
    np.testing.assert_array_equal(image, again)
    white = (image == 255).all(axis=-1)
    assert 0.3 < white.mean() < 0.95
    red = (image[..., 0] > 150) & (image[..., 1] < 80)  # the teapot's body
    orange = (image[..., 0] > 200) & (image[..., 1] > 120) & (image[..., 1] < 180) & (image[..., 2] < 100)  # the cat
    assert red.sum() > 20 and orange.sum() > 20
    three = multi_subject.subjects_collage(segments + segments[:1], np.random.default_rng(1), 64)
    assert three.shape == (64, 64, 3) and (three == 255).all(axis=-1).mean() > 0.3


def test_mudi_is_a_lora_method(loaded):
    config = tiny_cpu.get_config("mudi")
    sd, _ = loaded
    _, method = personalize.prepare(config, sd)
    assert method.name == "mudi" and method.lora.rank == 4 and method.stages[0].train.trainable == r"^lora/"


def test_the_loss_mask_is_resized_as_mudi_resizes_it():
    torch = pytest.importorskip("torch")
    mask = (np.random.default_rng(0).random((64, 48)) > 0.6).astype(np.float32)
    for size in ((8, 6), (16, 16), (128, 96)):
        theirs = torch.nn.functional.interpolate(torch.tensor(mask)[None, None], size=size, mode="bilinear")[0, 0]
        np.testing.assert_allclose(multi_subject.soft_mask(mask, size, 0.0), theirs.numpy(), atol=1e-6)
        np.testing.assert_allclose(multi_subject.soft_mask(mask, size, 0.4), theirs.numpy() * 0.6 + 0.4, atol=1e-6)


def test_a_template_file_with_named_slots_names_each_subject(tiny_assets):
    config = tiny_cpu.get_config("mudi")
    config.gal.anchors = str(Path(__file__).parent.parent / "configs" / "anchors" / "two_subjects.txt")
    concept = concept_lib.load_concept(config, tiny_assets["multi_subject_concept"], None)
    assert concept.anchor_prompts[5] == "<tiny-teapot> teapot sitting beside <tiny-cat> cat on the beach"
    assert concept.anchor_file.name == "two_subjects.txt"
