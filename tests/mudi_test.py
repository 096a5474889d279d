"""MuDI inside the loop: the multi-subject concept, Seg-Mix in the grain pipeline, the masked loss
in the step, and generation from mean-shifted noise (the tiny two-subject concept)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import tiny_cpu
from gal_jax import concept as concept_lib
from gal_jax import data, input_pipeline, multi_subject, personalize, sample, sharding


@pytest.fixture(scope="module")
def loaded(loaded_default_sd):
    return loaded_default_sd


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
    iterator = input_pipeline.make_train_iterator(train_set, global_batch_size=batch, seed=seed, resolution=64,
                                        segmix=segmix, latent_size=8)
    if start is not None:
        iterator.set_state(start)
    return iterator, [next(iterator) for _ in range(count)]


def test_segmix_mixes_masked_instances_with_their_caption_and_mask(mudi_set, loaded):
    sd, _ = loaded
    _, (batch,) = _batches(mudi_set, segmix=input_pipeline.SegMix(1.0, soft_alpha=0.25))
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
    iterator, batches = _batches(mudi_set, segmix=input_pipeline.SegMix(1.0, start_step=2, soft_alpha=0.0), count=3)
    assert [int((b["loss_mask"] < 1).any(axis=(1, 2)).sum()) for b in batches] == [0, 0, 6]
    stopped, _ = _batches(mudi_set, segmix=input_pipeline.SegMix(1.0, start_step=2, soft_alpha=0.0), count=2)
    _, (again,) = _batches(mudi_set, segmix=input_pipeline.SegMix(1.0, start_step=2, soft_alpha=0.0), start=stopped.get_state())
    for key in batches[2]:
        np.testing.assert_array_equal(again[key], batches[2][key])


def test_segmix_probability_holds_and_a_seed_repeats(mudi_set):
    _, batches = _batches(mudi_set, segmix=input_pipeline.SegMix(0.3, soft_alpha=0.0), count=60)
    rate = np.mean([(b["loss_mask"][b["weight"] == 1.0] < 1).any(axis=(1, 2)).mean() for b in batches])
    assert rate == pytest.approx(0.3, abs=0.06)
    _, repeat = _batches(mudi_set, segmix=input_pipeline.SegMix(0.3, soft_alpha=0.0), count=3)
    for first, second in zip(batches, repeat):
        np.testing.assert_array_equal(first["pixel_values"], second["pixel_values"])


def test_segmix_settings_are_checked(tiny_assets, loaded, tmp_path):
    with pytest.raises(ValueError, match=r"data.segmix.prob=1.5 must lie in \[0, 1\]"):
        input_pipeline.SegMix(1.5)
    with pytest.raises(ValueError, match=r"soft_alpha=2.0"):
        input_pipeline.SegMix(0.3, soft_alpha=2.0)
    sd, _ = loaded
    plain = data.write_training_set(data.load_concept(tiny_assets["object_concept"]), [], None, tmp_path / "set",
                                    sd.tokenize, 64)
    with pytest.raises(ValueError, match="needs a multi-subject set"):
        _batches(plain, segmix=input_pipeline.SegMix(0.3))


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


# ---------------------------------------------------------------------------------------------
# MuDI's prior set (class_metadata.jsonl with masks): paired by subject, mixed with the instances


def _prior_config(**data_fields):
    config = tiny_cpu.get_config("mudi")
    config.train.with_prior = True
    for key, value in data_fields.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def prior_concept(tiny_assets):
    return concept_lib.load_concept(_prior_config(), tiny_assets["multi_subject_concept"],
                                    tiny_assets["multi_subject_prior"])


def test_a_prior_folder_with_class_metadata_is_a_masked_prior_set(prior_concept, tiny_assets):
    prior = prior_concept.prior
    assert prior.subjects == {"a": "teapot", "b": "cat"}
    assert prior_concept.class_images == tuple(item.image for item in prior.images)
    assert [item.text for item in prior.of("b")] == ["a photo of a cat on the grass", "a photo of a cat on a table"]
    assert all(item.mask.is_file() for item in prior.images)
    # data.num_class_images caps each subject's class images, in file order.
    capped = concept_lib.load_concept(_prior_config(num_class_images=1), tiny_assets["multi_subject_concept"],
                                      tiny_assets["multi_subject_prior"])
    assert [item.image.name for item in capped.prior.images] == ["a00.jpg", "b00.jpg"]
    # Without train.with_prior there is no prior at all.
    config = _prior_config()
    config.train.with_prior = False
    off = concept_lib.load_concept(config, tiny_assets["multi_subject_concept"], tiny_assets["multi_subject_prior"])
    assert off.prior is None and off.class_images == ()


def test_a_prior_set_must_name_the_concepts_subjects(tiny_assets, tmp_path):
    from multi_subject_test import write_prior

    concept_dir = tiny_assets["multi_subject_concept"]  # subjects "a" and "b"
    unknown = write_prior(tmp_path / "unknown", first={"id": {"a": "teapot", "c": "dog"}}, lines=[
        json.dumps({"id": s, "file_name": f"{s}.png", "mask_path": f"mask_{s}.png", "text": "x"}) for s in "ac"])
    for s in "ac":  # images for the lines above
        (unknown / f"{s}.png").write_bytes((unknown / "a00.png").read_bytes())
        (unknown / f"mask_{s}.png").write_bytes((unknown / "mask_a00.png").read_bytes())
    with pytest.raises(multi_subject.MultiSubjectDataError,
                       match=r"unknown/class_metadata.jsonl, line 1: .*not subjects of the concept: \['c'\]"):
        concept_lib.load_concept(_prior_config(), concept_dir, unknown)
    missing = write_prior(tmp_path / "missing", first={"id": {"a": "teapot"}}, lines=[
        json.dumps({"id": "a", "file_name": "a00.png", "mask_path": "mask_a00.png", "text": "x"})])
    with pytest.raises(multi_subject.MultiSubjectDataError,
                       match=r"missing/class_metadata.jsonl, line 1: .*no class images for \['b'\]"):
        concept_lib.load_concept(_prior_config(), concept_dir, missing)
    config = tiny_cpu.get_config()  # one subject: the masks would be read as class images
    with pytest.raises(ValueError, match=r"class_metadata.jsonl: a masked prior set pairs .* one\s+subject"):
        concept_lib.load_concept(config, tiny_assets["object_concept"], tiny_assets["multi_subject_prior"])


def _prior_set(concept, tokenize, folder, resolution=64):
    """The concept's references, one GAL-queried image without a mask, and its masked prior set."""
    queried = data.Reference(concept.references[0].image, "a queried image", None, 0.5, "round-1")
    return data.write_training_set(list(concept.references) + [queried], list(concept.class_images), None, folder,
                                   tokenize, resolution, subjects=concept.subjects, prior=concept.prior)


def test_class_records_pair_by_subject_with_their_own_captions(prior_concept, loaded, tmp_path):
    sd, _ = loaded
    records, metadata = data.open_training_set(_prior_set(prior_concept, sd.tokenize, tmp_path / "set"))
    prior = prior_concept.prior
    assert metadata["prior_words"] == ["teapot", "cat"] and metadata["class_prompt"] is None
    np.testing.assert_array_equal(metadata["prior_segmix_ids"][0][1], sd.tokenize(
        ["a photo of a teapot and a cat, simple background."])[0])
    assert len(records) == 7  # max(6 instances + 1 queried, 4 class images)
    subjects = list(prior_concept.subjects)
    for i, record in enumerate(records):
        instance = int(record["instance_subject"])
        own = [j for j, item in enumerate(prior.images) if subjects[instance:instance + 1] == [item.subject]]
        # MuDI: class image index % m_c of the instance's subject; the queried image cycles through all.
        expected = own[i % len(own)] if instance >= 0 else i % len(prior.images)
        assert int(record["class_index"]) == expected
        item = prior.images[expected]
        assert int(record["class_subject"]) == subjects.index(item.subject)
        np.testing.assert_array_equal(record["class_ids"], sd.tokenize([item.text])[0])
        mask = multi_subject.load_segment(item.image, item.mask, 64)[1]
        np.testing.assert_allclose(record["class_mask"][..., 0] / 255.0, mask, atol=1 / 255)


@pytest.fixture(scope="module")
def solid_prior(loaded, tmp_path_factory):
    """A two-subject concept and its prior set in solid colours (multi_subject_test's fixtures),
    written at 32 px; 4 instances, 4 class images, so 4 records."""
    from multi_subject_test import write_dataset, write_prior

    sd, _ = loaded
    root = tmp_path_factory.mktemp("solid")
    concept = concept_lib.load_concept(_prior_config(), write_dataset(root / "concept", solid=True),
                                       write_prior(root / "reg" / "actionfigure_2_and_dog0"))
    train_set = data.write_training_set(list(concept.references), list(concept.class_images), None, root / "set",
                                        sd.tokenize, 32, subjects=concept.subjects, prior=concept.prior)
    return concept, train_set


def _solid_batch(train_set, segmix, seed=0):
    iterator = input_pipeline.make_train_iterator(train_set, global_batch_size=4, seed=seed, resolution=32, segmix=segmix,
                                        latent_size=4)
    return next(iterator)


def test_a_mixed_class_example_lays_its_own_subject_left_at_one_height(solid_prior, loaded):
    from multi_subject_test import PRIOR_CLASSES, PRIOR_COLOURS

    sd, _ = loaded
    _, train_set = solid_prior
    captions = {(own, other): sd.tokenize([multi_subject.SEGMIX_CAPTION.format(PRIOR_CLASSES[own],
                                                                               PRIOR_CLASSES[other])])[0]
                for own, other in (("a", "b"), ("b", "a"))}
    for seed in range(4):
        batch = _solid_batch(train_set, input_pipeline.SegMix(1.0, soft_alpha=0.0), seed)
        np.testing.assert_array_equal(batch["pixel_values"],
                                      _solid_batch(train_set, input_pipeline.SegMix(1.0, soft_alpha=0.0), seed)["pixel_values"])
        for row in np.nonzero(batch["is_prior"])[0]:
            own, other = next(pair for pair, ids in captions.items() if (ids == batch["input_ids"][row]).all())
            pixels = np.round((batch["pixel_values"][row] + 1) * 127.5).astype(np.uint8)
            union = ~(pixels == 255).all(axis=-1)
            colour = {s: (pixels == PRIOR_COLOURS[s]).all(axis=-1) for s in (own, other)}
            assert (colour[own] | colour[other] == union).all(), "only the two class subjects, on white"
            leftmost = int(np.nonzero(union.any(axis=0))[0][0])
            assert colour[own][:, leftmost].any(), "the class example's own subject lies left"
            tops = [int(np.nonzero(colour[s].any(axis=1))[0][0]) for s in (own, other)]
            assert tops[0] == tops[1], "both at one height"
            np.testing.assert_allclose(batch["loss_mask"][row], multi_subject.soft_mask(union, (4, 4), 0.0), atol=1e-6)


def test_a_class_example_is_kept_as_is_while_its_instance_is_not_mixed(solid_prior, loaded):
    sd, _ = loaded
    concept, train_set = solid_prior
    batch = _solid_batch(train_set, input_pipeline.SegMix(1.0, start_step=100))  # Seg-Mix on, not started
    np.testing.assert_array_equal(batch["loss_mask"], 1.0)
    own_captions = {tuple(ids) for ids in sd.tokenize([item.text for item in concept.prior.images])}
    assert all(tuple(ids) in own_captions for ids in batch["input_ids"][batch["is_prior"]])
    white = (batch["pixel_values"][batch["is_prior"]] == 1.0).all(axis=-1).mean()
    assert white < 0.5  # the solid class images, not a composite on white


def test_a_masked_prior_without_segmix_reads_as_a_plain_class_folder(prior_concept, loaded, tmp_path):
    sd, _ = loaded
    masked = _prior_set(prior_concept, sd.tokenize, tmp_path / "masked")
    records, _ = data.open_training_set(masked)
    paired = [prior_concept.class_images[int(r["class_index"])] for r in records]
    references = list(prior_concept.references) + [
        data.Reference(prior_concept.references[0].image, "a queried image", None, 0.5, "round-1")]
    plain = data.write_training_set(references, paired, "a photo of a teapot", tmp_path / "plain", sd.tokenize, 64,
                                    subjects=prior_concept.subjects)
    _, (with_prior,) = _batches(masked, segmix=None)
    _, (without,) = _batches(plain, segmix=None)
    for key in ("pixel_values", "weight", "is_prior"):
        np.testing.assert_array_equal(with_prior[key], without[key])
    instance = ~with_prior["is_prior"]
    np.testing.assert_array_equal(with_prior["input_ids"][instance], without["input_ids"][instance])
    # Seg-Mix over a plain class folder mixes the instances only: the class loss stays all ones.
    _, (mixed,) = _batches(plain, segmix=input_pipeline.SegMix(1.0, soft_alpha=0.0))
    np.testing.assert_array_equal(mixed["loss_mask"][mixed["is_prior"]], 1.0)
    assert (mixed["loss_mask"][~mixed["is_prior"]] < 1).any()


def test_mudi_trains_with_a_mixed_masked_prior_set(prior_concept, loaded, tmp_path):
    from gal_jax import trainer as trainer_lib

    sd, params = loaded
    train_set = _prior_set(prior_concept, sd.tokenize, tmp_path / "set")
    config = _prior_config()
    config.train.steps, config.train.batch_size, config.train.grad_accum_steps = 2, 4, 1
    config.train.loss_terms.dco.beta = 0.0  # prior preservation instead of DCO
    config.data.segmix.prob, config.data.segmix.soft_alpha = 1.0, 0.5
    trainer = trainer_lib.Trainer(config, sd, sharding.make_mesh())
    assert trainer._examples_per_step(train_set) == 8  # 4 instances and their 4 class images
    _, metrics = trainer.train_round(params, train_set, progress=False)
    assert [p["step"] for p in metrics["loss_curve"]][-1] == 2 and np.isfinite(metrics["loss_curve"][-1]["loss"])
