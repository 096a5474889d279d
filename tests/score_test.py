"""CLIP scoring on device: parity with transformers' CLIPProcessor + CLIPModel, the similarities GAL
queries with, caching, one compilation per image size, bad input."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from gal_jax import sample, score, sharding

PROMPTS = ["a teapot on a table", "a cat in watercolor painting style", "a dog on the beach"]


@pytest.fixture(scope="module")
def scorer(loaded_clip):
    clip, params = loaded_clip
    return score.Scorer(clip, params, sharding.make_mesh(4, 2), batch_size=8)


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Returns uint8 images (count, height, width, 3) with image-like structure (upsampled noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((width, height), Image.BILINEAR)) for c in coarse])


def transformers_similarities(folder, images: np.ndarray, prompts) -> np.ndarray:
    """Returns cosine similarities (images x prompts) from CLIPProcessor + PyTorch CLIPModel."""
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding="max_length")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values)
        text = model.get_text_features(input_ids=inputs.input_ids)
    image, text = (x / x.norm(dim=-1, keepdim=True) for x in (image, text))
    return (image @ text.T).numpy()


@pytest.mark.parametrize("height, width", [(64, 64), (512, 512), (300, 200)], ids=["up", "down", "portrait"])
def test_similarities_match_transformers_clip_processor_and_model(tiny_models, scorer, height, width):
    images = smooth_images(5, height, width)
    ours = np.asarray(scorer.image_embeddings(images) @ scorer.text_embeddings(PROMPTS).T)
    reference = transformers_similarities(tiny_models["clip"], images, PROMPTS)
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_preprocessing_matches_clip_image_processor_up_to_one_resize_level(tiny_models, loaded_clip):
    from transformers import CLIPImageProcessor

    clip, _ = loaded_clip
    images = smooth_images(2, 200, 333, seed=1)
    reference = CLIPImageProcessor.from_pretrained(tiny_models["clip"])(list(images), return_tensors="np")
    ours = np.asarray(score.preprocess(images, clip.image_size, clip.image_mean, clip.image_std))
    assert ours.shape == reference.pixel_values.shape == (2, 3, 224, 224)
    # Both round the resized image to uint8; the bicubic filters differ by at most one level.
    one_level = 1.0 / 255 / min(clip.image_std) + 1e-6
    assert np.abs(ours - reference.pixel_values).max() <= one_level


def test_resized_shape_keeps_the_aspect_ratio_like_transformers():
    assert score.resized_shape(512, 512, 224) == (224, 224)
    assert score.resized_shape(300, 200, 224) == (336, 224)
    assert score.resized_shape(200, 333, 224) == (224, 372)


def test_similarities_give_each_image_its_anchor_and_every_plain_prompt(scorer):
    images = smooth_images(6, 64, 64, seed=2)
    anchors, plains = PROMPTS[:2], ["a teapot", "a photo of a teapot", "a cat"]
    anchor_of_image = [0, 0, 0, 1, 1, 1]
    sim_anchor, sim_plain = scorer.similarities(images, anchor_of_image, anchors, plains)
    assert sim_anchor.shape == (6,) and sim_plain.shape == (6, 3)
    image_embeddings = np.asarray(scorer.image_embeddings(images))
    expected_anchor = (image_embeddings * np.asarray(scorer.text_embeddings(anchors))[anchor_of_image]).sum(-1)
    np.testing.assert_allclose(sim_anchor, expected_anchor, atol=1e-5)
    np.testing.assert_allclose(sim_plain, image_embeddings @ np.asarray(scorer.text_embeddings(plains)).T, atol=1e-5)


def test_embeddings_are_unit_norm_and_text_is_cached_per_prompt(scorer):
    texts = scorer.text_embeddings(PROMPTS)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(texts), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(scorer.image_embeddings(smooth_images(3, 64, 64))), axis=-1),
                               1.0, atol=1e-5)

    def no_encoding(*args):
        raise AssertionError("cached prompts were encoded again")

    cached = scorer._embed_texts
    scorer._embed_texts = no_encoding
    try:
        again = scorer.text_embeddings(list(reversed(PROMPTS)))
    finally:
        scorer._embed_texts = cached
    np.testing.assert_array_equal(np.asarray(again), np.asarray(texts)[::-1])


def test_scores_sharded_device_arrays_like_the_generator_returns(scorer):
    images = smooth_images(16, 64, 64, seed=3)
    on_host = np.asarray(scorer.image_embeddings(images))
    for placed in (jax.device_put(images, sharding.batch_sharding(scorer.mesh)),
                   jax.device_put(images[:13], sharding.replicated(scorer.mesh))):
        np.testing.assert_allclose(np.asarray(scorer.image_embeddings(placed)), on_host[: placed.shape[0]], atol=1e-5)


def test_image_embedding_compiles_once_per_image_size(loaded_clip):
    clip, params = loaded_clip
    scorer = score.Scorer(clip, params, sharding.make_mesh(8, 1), batch_size=8)
    for count in (3, 8, 13, 1):  # one batch, exactly one, two with padding, one again
        assert scorer.image_embeddings(smooth_images(count, 64, 64)).shape == (count, 32)
    assert scorer.image_traces == 1


def test_compiled_batch_reports_flops_and_embeds_a_batch(scorer):
    compiled, args = scorer.compiled_batch(64, 64)
    assert isinstance(compiled, jax.stages.Compiled)
    cost = compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] > 0
    assert compiled(*args).shape == (scorer.batch_size, 32)


def test_batch_size_is_rounded_up_to_the_mesh_shards(loaded_clip):
    clip, params = loaded_clip
    assert score.Scorer(clip, params, sharding.make_mesh(8, 1), batch_size=5).batch_size == 8
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score.Scorer(clip, params, sharding.make_mesh(8, 1), batch_size=0)


def test_no_images_give_empty_similarities(scorer):
    sim_anchor, sim_plain = scorer.similarities(np.zeros((0, 64, 64, 3), np.uint8), [], PROMPTS[:1], PROMPTS)
    assert sim_anchor.shape == (0,) and sim_plain.shape == (0, 3)


@pytest.mark.parametrize(
    "anchor_of_image, match",
    [([0, 1], "2 entries for 3 images"), ([0, 0, 2], r"must lie in \[0, 2\)"), ([-1, 0, 0], r"\[0, 2\)")],
)
def test_bad_anchor_indices_are_rejected(scorer, anchor_of_image, match):
    with pytest.raises(ValueError, match=match):
        scorer.similarities(smooth_images(3, 64, 64), anchor_of_image, PROMPTS[:2], PROMPTS)


def test_images_that_are_not_uint8_nhwc_are_rejected(scorer):
    with pytest.raises(ValueError, match="must be uint8"):
        scorer.image_embeddings(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(n, height, width, 3\)"):
        scorer.image_embeddings(np.zeros((2, 3, 64, 64), np.uint8))


def test_over_long_prompt_is_truncated_with_a_warning(scorer):
    with pytest.warns(sample.PromptTruncatedWarning, match="truncated"):
        embedding = scorer.text_embeddings(["a cat " * 60])
    assert embedding.shape == (1, 32)


def test_square_strips_keep_every_column_on_white():
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    strips = np.asarray(score.square_strips(images, 2))
    assert strips.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(strips[1][:, 2:6], images[0][:, 4:8])  # image 0, right strip, centred
    np.testing.assert_array_equal(strips[2][:, 2:6], images[1][:, 0:4])
    assert (strips[:, :, :2] == 255).all() and (strips[:, :, 6:] == 255).all()
    with pytest.raises(ValueError, match="into 9 strips"):
        score.square_strips(images, 9)


def test_subject_similarities_are_strip_cosines_averaged_over_each_subjects_images(scorer):
    images = smooth_images(3, 64, 64, seed=1)
    subject_images = [smooth_images(2, 64, 64, seed=2), smooth_images(1, 64, 64, seed=3)]
    sims = scorer.subject_similarities(images, subject_images)
    assert sims.shape == (3, 2, 2)
    strips = np.asarray(scorer.image_embeddings(np.asarray(score.square_strips(images, 2))))
    references = [np.asarray(scorer.image_embeddings(x)) for x in subject_images]
    expected = np.stack([(strips @ r.T).mean(-1) for r in references], -1).reshape(3, 2, 2)
    np.testing.assert_allclose(sims, expected, atol=1e-6)
    # Each strip is scored alone: a subject whose image is the left strip itself is its best match.
    left_strip = np.asarray(score.square_strips(images[:1], 2))[:1]
    white = np.full_like(left_strip, 255)
    sims = scorer.subject_similarities(images[:1], [white, left_strip])
    assert sims[0, 0, 1] == pytest.approx(1.0, abs=1e-5) and sims[0, 0, 1] > sims[0, 0, 0]
    with pytest.raises(ValueError, match=">= 2 subjects"):
        scorer.subject_similarities(images, subject_images[:1])
