"""Tests for gal_jax.metrics: TXT-ALN, IMG-ALN, OVF and placeholder insertion."""

import math

import numpy as np
import pytest

from gal_jax import metrics

SQRT_HALF = math.sqrt(0.5)


def test_cosine_matrix_normalises_rows():
    a = np.array([[3.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [5.0, 0.0], [-1.0, -1.0]])
    expected = [[0.0, 1.0, -SQRT_HALF], [SQRT_HALF, SQRT_HALF, -1.0]]
    np.testing.assert_allclose(metrics.cosine_matrix(a, b), expected, atol=1e-15)


@pytest.mark.parametrize(
    "a, b, problem",
    [
        (np.ones((2, 3)), np.ones((2, 4)), "embedding sizes differ"),
        (np.ones(3), np.ones((2, 3)), "non-empty"),
        (np.zeros((0, 3)), np.ones((2, 3)), "non-empty"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((1, 2)), "all-zero row 1"),
        (np.array([[1.0, np.nan]]), np.ones((1, 2)), "NaN"),
    ],
)
def test_cosine_matrix_rejects_bad_embeddings(a, b, problem):
    with pytest.raises(ValueError, match=problem):
        metrics.cosine_matrix(a, b)


def test_txt_alignment_is_the_mean_of_paired_cosines():
    images = np.array([[1.0, 0.0], [0.0, 2.0]])
    prompts = np.array([[1.0, 1.0], [0.0, 1.0]])  # cosines sqrt(1/2) and 1
    expected = (SQRT_HALF + 1.0) / 2
    assert metrics.txt_alignment(images, prompts) == pytest.approx(expected, rel=1e-15)
    assert metrics.txt_alignment(images, prompts, scale=2.5) == pytest.approx(2.5 * expected)


def test_txt_alignment_pairs_rows_not_all_pairs():
    images = np.eye(2)
    assert metrics.txt_alignment(images, images) == pytest.approx(1.0)  # all pairs would give 0.5


def test_txt_alignment_rejects_unpaired_rows_and_bad_scale():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.txt_alignment(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="scale"):
        metrics.txt_alignment(np.ones((2, 2)), np.ones((2, 2)), scale=0.0)


def test_img_alignment_is_the_mean_over_all_generated_reference_pairs():
    generated = np.array([[1.0, 0.0], [0.0, 1.0]])
    references = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    # Cosines: row 1 -> 1, sqrt(1/2), 0; row 2 -> 0, sqrt(1/2), -1.
    expected = (1.0 + SQRT_HALF + 0.0 + 0.0 + SQRT_HALF - 1.0) / 6
    assert metrics.img_alignment(generated, references) == pytest.approx(expected, rel=1e-15)


def test_overfit_fraction_counts_images_closer_to_a_reference_caption_than_to_their_prompt():
    images = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    prompts = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    captions = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    # Image 0: prompt 1 vs captions max 0 -> fine. Image 1: prompt 0 vs caption 1 -> overfit.
    # Image 2: prompt 1 vs max(0, -1) -> fine. Image 3: prompt and caption both sqrt(1/2): a tie,
    # not overfit under the strict '<' of the evaluation notebook.
    assert metrics.overfit_fraction(images, prompts, captions) == pytest.approx(0.25)


def test_overfit_fraction_is_invariant_to_embedding_scale():
    rng = np.random.default_rng(0)
    images, prompts = rng.normal(size=(8, 5)), rng.normal(size=(8, 5))
    captions = rng.normal(size=(3, 5))
    assert metrics.overfit_fraction(images, prompts, captions) == metrics.overfit_fraction(
        3.0 * images, 0.5 * prompts, 7.0 * captions
    )


def test_insert_placeholder_goes_before_the_class_word():
    assert metrics.insert_placeholder("cat swimming in a pool", "cat", "<cute-cat>") == (
        "<cute-cat> cat swimming in a pool"
    )
    assert metrics.insert_placeholder("construction outfit wearing cat", "cat", "<cute-cat>") == (
        "construction outfit wearing <cute-cat> cat"
    )


def test_insert_placeholder_goes_before_every_whole_word_ignoring_case():
    assert metrics.insert_placeholder("A catalog with a Cat and a cat", "cat", "sks") == (
        "A catalog with a sks Cat and a sks cat"
    )


@pytest.mark.parametrize("prompt, class_word, placeholder, expected", [
    # The authors' test prompts whose last class word names the concept.
    ("a study table in the style of table", "table", "<brown-table>",
     "a study <brown-table> table in the style of <brown-table> table"),
    ("a dahlia flower in the style of flower", "flower", "<white-flower>",
     "a dahlia <white-flower> flower in the style of <white-flower> flower"),
    ("An egg chair in the style of chair", "chair", "<blue-chair>",
     "An egg <blue-chair> chair in the style of <blue-chair> chair"),
    ("a teapot in the style of wooden pot", "wooden_pot", "<wooden-pot>",
     "a teapot in the style of <wooden-pot> wooden pot"),
])
def test_insert_placeholder_marks_the_concept_in_the_authors_style_prompts(prompt, class_word, placeholder, expected):
    assert metrics.insert_placeholder(prompt, class_word, placeholder) == expected


def test_insert_placeholder_reads_underscores_in_class_words_as_spaces():
    assert metrics.insert_placeholder("Photo of wooden pot", "wooden_pot", "<wooden-pot>") == (
        "Photo of <wooden-pot> wooden pot"
    )


@pytest.mark.parametrize(
    "prompt, class_word, placeholder, problem",
    [
        ("a dog in a park", "cat", "sks", "does not occur"),
        ("a catalog", "cat", "sks", "does not occur"),
        ("a <cute-cat> cat", "cat", "<cute-cat>", "already contains"),
        ("a cat", "cat", " ", "non-empty"),
    ],
)
def test_insert_placeholder_rejects_bad_input(prompt, class_word, placeholder, problem):
    with pytest.raises(ValueError, match=problem):
        metrics.insert_placeholder(prompt, class_word, placeholder)
