"""Tests for gal_jax.acquisition: GAL_SPEC.md steps 3-7 on hand-computed values."""

import math

import numpy as np
import pytest

from gal_jax import acquisition

LN2 = math.log(2.0)


def entropy_formula(p):
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


# --- overfit flags -----------------------------------------------------------------------------


def test_image_is_overfit_when_anchor_similarity_does_not_beat_every_plain_prompt():
    sim_anchor = np.array([0.30, 0.20, 0.25, 0.10])
    sim_plain = np.array([
        [0.10, 0.29],  # anchor wins over both plain prompts -> not overfit
        [0.21, 0.05],  # first plain prompt wins -> overfit
        [0.25, 0.00],  # exact tie with the max counts as overfit (<=)
        [0.05, 0.09],  # anchor wins -> not overfit
    ])
    np.testing.assert_array_equal(
        acquisition.overfit_flags(sim_anchor, sim_plain), [False, True, True, False]
    )


def test_overfit_flags_work_on_a_whole_round_of_directions():
    sim_anchor = np.array([[0.3, 0.1], [0.2, 0.4]])
    sim_plain = np.array([[[0.2], [0.2]], [[0.3], [0.3]]])
    np.testing.assert_array_equal(
        acquisition.overfit_flags(sim_anchor, sim_plain), [[False, True], [True, False]]
    )


@pytest.mark.parametrize(
    "sim_anchor, sim_plain",
    [
        (np.zeros(3), np.zeros((4, 2))),  # image counts differ
        (np.zeros(3), np.zeros(3)),  # no plain-prompt axis
        (np.zeros(3), np.zeros((3, 0))),  # no plain prompts
    ],
)
def test_overfit_flags_reject_mismatched_shapes(sim_anchor, sim_plain):
    with pytest.raises(ValueError, match="sim_plain"):
        acquisition.overfit_flags(sim_anchor, sim_plain)


def test_overfit_flags_reject_nan_similarities_naming_the_array_and_index():
    sim_plain = np.zeros((3, 2))
    sim_plain[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"sim_plain .*nan at index \(1, 1\)"):
        acquisition.overfit_flags(np.zeros(3), sim_plain)
    with pytest.raises(ValueError, match="sim_anchor"):
        acquisition.overfit_flags(np.array([0.0, np.nan, 0.0]), np.zeros((3, 2)))


def test_overfit_rate_is_the_fraction_of_flags_set():
    assert acquisition.overfit_rate([True, False, False, True, True]) == pytest.approx(0.6)
    assert acquisition.overfit_rate([False] * 10) == 0.0


def test_overfit_rate_rejects_no_images():
    with pytest.raises(ValueError, match="non-empty"):
        acquisition.overfit_rate([])


# --- entropy -----------------------------------------------------------------------------------


def test_entropy_of_half_overfit_direction_is_ln2():
    assert acquisition.direction_entropy(0.5) == pytest.approx(LN2, abs=1e-15)


def test_entropy_matches_the_binary_entropy_formula_in_nats():
    for p in (0.1, 0.3, 0.7, 0.9):
        assert acquisition.direction_entropy(p) == pytest.approx(entropy_formula(p), abs=1e-15)
    assert acquisition.direction_entropy(0.3) == pytest.approx(0.6108643020548935, abs=1e-15)


def test_entropy_is_zero_when_all_images_overfit_or_none_do():
    assert acquisition.direction_entropy(1.0) == 0.0
    assert acquisition.direction_entropy(0.0) == 0.0


def test_entropy_is_symmetric_around_one_half():
    assert acquisition.direction_entropy(0.2) == pytest.approx(acquisition.direction_entropy(0.8))


def test_vectorised_entropies_match_the_scalar_entropy():
    rates = np.array([0.0, 0.1, 0.5, 0.3, 1.0])
    expected = [0.0, entropy_formula(0.1), LN2, entropy_formula(0.3), 0.0]
    np.testing.assert_allclose(acquisition.direction_entropies(rates), expected, atol=1e-15)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_entropy_rejects_rates_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="rates must lie in"):
        acquisition.direction_entropy(rate)


# --- openness, top-k, stopping ------------------------------------------------------------------


def test_openness_is_lambda_times_mean_entropy_over_scored_directions():
    entropies = [LN2, 0.0, entropy_formula(0.3)]
    expected = 0.005 * (LN2 + entropy_formula(0.3)) / 3
    assert acquisition.openness(entropies, 0.005) == pytest.approx(expected, rel=1e-15)


def test_openness_is_zero_when_no_direction_was_scored():
    assert acquisition.openness([], 0.005) == 0.0


@pytest.mark.parametrize("lam", [-0.001, float("nan")])
def test_openness_rejects_negative_lambda(lam):
    with pytest.raises(ValueError, match="lambda"):
        acquisition.openness([LN2], lam)


def test_top_k_takes_highest_entropies_most_uncertain_first():
    entropies = [0.1, 0.6, 0.0, 0.3, 0.5]
    assert acquisition.top_k_uncertain(entropies, 3) == [1, 4, 3]


def test_top_k_breaks_ties_by_pool_order():
    entropies = [0.2, LN2, 0.2, LN2, 0.2]
    assert acquisition.top_k_uncertain(entropies, 3) == [1, 3, 0]
    assert acquisition.top_k_uncertain(entropies, 4) == [1, 3, 0, 2]


def test_top_k_picks_zero_entropy_directions_only_when_fewer_than_k_are_uncertain():
    entropies = [0.0, 0.4, 0.0, 0.0]
    # Only one direction has H > 0; the H == 0 ones fill up in pool order ...
    assert acquisition.top_k_uncertain(entropies, 3) == [1, 0, 2]
    # ... and that is exactly when the stop rule fires, so they are never queried.
    assert acquisition.should_stop(entropies, 3)


def test_top_k_returns_the_whole_pool_when_k_exceeds_it():
    assert acquisition.top_k_uncertain([0.1, 0.2], 3) == [1, 0]


def test_stop_when_fewer_than_k_directions_have_positive_entropy():
    assert acquisition.should_stop([0.5, 0.0, 0.2, 0.0], 3)
    assert not acquisition.should_stop([0.5, 0.0, 0.2, 0.1], 3)
    assert acquisition.should_stop([], 1)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_k_below_one_or_not_an_integer_is_rejected(k):
    with pytest.raises(ValueError, match="k"):
        acquisition.top_k_uncertain([0.1, 0.2], k)
    with pytest.raises(ValueError, match="k"):
        acquisition.should_stop([0.1, 0.2], k)


@pytest.mark.parametrize("entropies", [[0.1, float("nan")], [0.1, -0.2], [[0.1, 0.2]]])
def test_bad_entropies_are_rejected(entropies):
    with pytest.raises(ValueError, match="entropies"):
        acquisition.top_k_uncertain(entropies, 1)


# --- best image, weights, random mode -----------------------------------------------------------


def test_best_image_has_highest_anchor_similarity_first_on_ties():
    assert acquisition.best_image([0.1, 0.3, 0.2]) == 1
    assert acquisition.best_image([0.1, 0.3, 0.3]) == 1


def test_best_image_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="sim_anchor"):
        acquisition.best_image([0.1, float("nan")])
    with pytest.raises(ValueError, match="sim_anchor"):
        acquisition.best_image([])


def test_new_reference_weight_is_openness_with_balance_and_one_without():
    assert acquisition.new_reference_weight(0.0021, balance=True) == 0.0021
    assert acquisition.new_reference_weight(0.0021, balance=False) == 1.0
    with pytest.raises(ValueError, match="openness"):
        acquisition.new_reference_weight(-0.1, balance=True)


def test_random_directions_are_distinct_in_pool_order_and_fixed_by_seed_and_round():
    first = acquisition.random_directions(18, 3, seed=0, round_index=1)
    assert first == acquisition.random_directions(18, 3, seed=0, round_index=1)
    assert len(set(first)) == 3 and first == sorted(first)
    assert all(0 <= d < 18 for d in first)
    draws = {tuple(acquisition.random_directions(18, 3, seed=0, round_index=r)) for r in range(6)}
    assert len(draws) > 1  # the round changes the draw
    draws = {tuple(acquisition.random_directions(18, 3, seed=s, round_index=1)) for s in range(6)}
    assert len(draws) > 1  # so does the seed


def test_random_directions_take_the_whole_pool_when_k_exceeds_it():
    assert acquisition.random_directions(2, 3, seed=0, round_index=0) == [0, 1]
    assert acquisition.random_directions(0, 3, seed=0, round_index=0) == []


def test_random_directions_reject_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        acquisition.random_directions(18, 0, seed=0, round_index=0)
    with pytest.raises(ValueError, match="num_pool"):
        acquisition.random_directions(-1, 3, seed=0, round_index=0)


# --- score_directions + select_queries (what the driver calls) ----------------------------------


def make_round():
    """Returns (sim_anchor, sim_plain) of 4 directions x 10 images; overfit_counts[d] overfit."""
    overfit_counts = [5, 0, 3, 10]
    sim_anchor = np.full((4, 10), 0.3)
    for d, count in enumerate(overfit_counts):
        sim_anchor[d, :count] = 0.1  # below the plain prompts' 0.2 -> overfit
    sim_anchor[0, 7] = 0.35  # the best image of direction 0
    sim_anchor[2, 4] = sim_anchor[2, 8] = 0.4  # a tie: direction 2 takes image 4
    sim_plain = np.stack([np.full((4, 10), 0.2), np.full((4, 10), 0.15)], axis=-1)
    return sim_anchor, sim_plain


def test_score_directions_gives_rates_entropies_and_best_images():
    scores = acquisition.score_directions(*make_round())
    assert scores.flags.shape == (4, 10) and scores.flags.dtype == bool
    np.testing.assert_allclose(scores.rates, [0.5, 0.0, 0.3, 1.0])
    np.testing.assert_allclose(scores.entropies, [LN2, 0.0, entropy_formula(0.3), 0.0], atol=1e-15)
    np.testing.assert_array_equal(scores.best_images[[0, 2]], [7, 4])


def test_select_queries_stops_when_fewer_than_k_directions_are_uncertain():
    scores = acquisition.score_directions(*make_round())
    selection = acquisition.select_queries(scores, k=3, lam=0.005, balance=True)
    assert selection.stopped
    assert selection.directions == () and selection.images == ()
    assert selection.openness == pytest.approx(0.005 * (LN2 + entropy_formula(0.3)) / 4)


def test_select_queries_takes_top_k_directions_with_their_best_images():
    scores = acquisition.score_directions(*make_round())
    selection = acquisition.select_queries(scores, k=2, lam=0.005, balance=True)
    expected_openness = 0.005 * (LN2 + entropy_formula(0.3)) / 4
    assert not selection.stopped
    assert selection.directions == (0, 2)
    assert selection.images == (7, 4)
    assert selection.openness == pytest.approx(expected_openness, rel=1e-15)
    assert selection.weight == selection.openness


def test_select_queries_without_balance_gives_new_references_weight_one():
    scores = acquisition.score_directions(*make_round())
    selection = acquisition.select_queries(scores, k=2, lam=0.005, balance=False)
    assert selection.weight == 1.0 and selection.openness > 0


def test_score_directions_rejects_a_flat_similarity_vector():
    with pytest.raises(ValueError, match="directions, images"):
        acquisition.score_directions(np.zeros(10), np.zeros((10, 2)))
