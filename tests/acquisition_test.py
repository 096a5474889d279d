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
    assert acquisition.TIE_BREAK == "pool order"


def scores_of_overfit_counts(overfit_counts, num_images=10):
    """Returns score_directions of directions whose first overfit_counts[d] images overfit."""
    sim_anchor = np.where(np.arange(num_images) < np.asarray(overfit_counts)[:, None], 0.1, 0.3)
    return acquisition.score_directions(sim_anchor, np.full(sim_anchor.shape + (1,), 0.2))


def test_ten_images_give_six_distinct_entropies_so_ties_are_common_and_keep_pool_order():
    scores = scores_of_overfit_counts(range(11))
    assert len(np.unique(scores.entropies)) == 6  # exactly: H(k/10) == H(1 - k/10) bit for bit
    # 18 directions of 10 images: 3 and 7 overfit images tie (H(0.3) == H(0.7)), so do 4 and 6, 5 and 5.
    overfit_counts = [1, 3, 5, 7, 3, 0, 5, 7, 2, 8, 10, 6, 4, 9, 1, 2, 8, 0]
    entropies = scores_of_overfit_counts(overfit_counts).entropies
    assert acquisition.top_k_uncertain(entropies, 3) == [2, 6, 11]  # 0.5, 0.5, then 0.6 before 0.4
    assert acquisition.top_k_uncertain(entropies, 7) == [2, 6, 11, 12, 1, 3, 4]  # then 0.3, 0.7, 0.3


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


def test_random_image_is_fixed_by_seed_round_and_direction_and_covers_every_image():
    draw = acquisition.random_image(10, seed=0, round_index=1, prompt_id=4)
    assert draw == acquisition.random_image(10, seed=0, round_index=1, prompt_id=4)
    assert 0 <= draw < 10
    by_direction = {acquisition.random_image(10, seed=0, round_index=1, prompt_id=p) for p in range(18)}
    by_seed = {acquisition.random_image(10, seed=s, round_index=1, prompt_id=4) for s in range(18)}
    by_round = {acquisition.random_image(10, seed=0, round_index=r, prompt_id=4) for r in range(18)}
    assert min(len(by_direction), len(by_seed), len(by_round)) > 1
    assert {acquisition.random_image(3, seed=s, round_index=1, prompt_id=0) for s in range(40)} == {0, 1, 2}
    assert acquisition.random_image(1, seed=5, round_index=2, prompt_id=7) == 0


def test_random_image_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_images"):
        acquisition.random_image(0, seed=0, round_index=1, prompt_id=0)
    with pytest.raises(ValueError, match="prompt_id"):
        acquisition.random_image(10, seed=0, round_index=1, prompt_id=-1)


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


def test_select_random_takes_one_random_image_of_each_random_direction():
    scores = acquisition.score_directions(*make_round())
    prompt_ids = [4, 9, 11, 17]  # the pool's original anchor ids
    selection = acquisition.select_random(scores, prompt_ids, k=2, lam=0.005, balance=True, seed=3, round_index=2)
    directions = acquisition.random_directions(4, 2, seed=3, round_index=2)
    assert selection.directions == tuple(directions)
    assert selection.images == tuple(acquisition.random_image(10, 3, 2, prompt_ids[d]) for d in directions)
    # Every direction was scored: openness is measured, not 0 as with the authors' one image each.
    assert selection.openness == pytest.approx(0.005 * (LN2 + entropy_formula(0.3)) / 4)
    assert selection.weight == selection.openness and not selection.stopped


def test_select_random_with_the_best_image_rule_takes_the_highest_sim_anchor():
    scores = acquisition.score_directions(*make_round())
    selection = acquisition.select_random(scores, [4, 9, 11, 17], k=4, lam=0.005, balance=False, seed=3,
                                          round_index=2, image="best")
    assert selection.directions == (0, 1, 2, 3)
    assert selection.images == tuple(int(i) for i in scores.best_images)
    assert selection.weight == 1.0


def test_random_images_are_not_the_best_ones():
    """The paper's random baseline does not flatter itself with the CLIP-best image."""
    scores = acquisition.score_directions(*make_round())
    selections = [acquisition.select_random(scores, [4, 9, 11, 17], 2, 0.005, True, seed, 1) for seed in range(10)]
    picked = [(d, i) for s in selections for d, i in zip(s.directions, s.images)]
    assert sum(i != scores.best_images[d] for d, i in picked) > len(picked) // 2


def test_select_random_rejects_an_unknown_image_rule_and_mismatched_prompt_ids():
    scores = acquisition.score_directions(*make_round())
    with pytest.raises(ValueError, match="'first'"):
        acquisition.select_random(scores, [4, 9, 11, 17], 2, 0.005, True, 0, 1, image="first")
    with pytest.raises(ValueError, match="3 prompt_ids for 4"):
        acquisition.select_random(scores, [4, 9, 11], 2, 0.005, True, 0, 1)


def test_score_directions_rejects_a_flat_similarity_vector():
    with pytest.raises(ValueError, match="directions, images"):
        acquisition.score_directions(np.zeros(10), np.zeros((10, 2)))


# --- identity check (several subjects) --------------------------------------------------------


def test_an_image_is_mixed_when_its_strips_do_not_find_every_subject():
    sims = np.array([
        [[0.9, 0.1], [0.2, 0.8]],  # left a, right b: both found
        [[0.2, 0.8], [0.9, 0.1]],  # left b, right a: both found, other order
        [[0.9, 0.1], [0.7, 0.6]],  # both strips look like a: mixed
        [[0.5, 0.5], [0.5, 0.5]],  # a tie goes to the first subject in both strips: mixed
    ])
    np.testing.assert_array_equal(acquisition.identity_mixed(sims), [False, False, True, True])
    three = np.eye(3)[[2, 0, 1]]  # strips find c, a, b
    assert not acquisition.identity_mixed(three)
    assert acquisition.identity_mixed(np.eye(3)[[0, 0, 1]])


@pytest.mark.parametrize("shape", [(2,), (4, 2, 3), (4, 1, 1)])
def test_identity_check_needs_square_subject_similarities(shape):
    with pytest.raises(ValueError, match="sim_subjects must be"):
        acquisition.identity_mixed(np.zeros(shape))


def test_mixed_images_count_against_a_direction_with_the_identity_check():
    sim_anchor = np.array([[0.3, 0.3, 0.3, 0.3]])
    sim_plain = np.array([[[0.1], [0.1], [0.1], [0.5]]])  # only the last image is overfit
    apart, together = [[0.9, 0.1], [0.1, 0.9]], [[0.9, 0.1], [0.9, 0.1]]
    sim_subjects = np.array([[apart, together, apart, apart]])
    plain = acquisition.score_directions(sim_anchor, sim_plain)
    checked = acquisition.score_directions(sim_anchor, sim_plain, sim_subjects)
    assert plain.rates[0] == 0.25 and plain.mixed is None
    assert checked.rates[0] == 0.5 and checked.entropies[0] == pytest.approx(LN2)
    np.testing.assert_array_equal(checked.overfit[0], [False, False, False, True])
    np.testing.assert_array_equal(checked.mixed[0], [False, True, False, False])
    with pytest.raises(ValueError, match="sim_subjects shape"):
        acquisition.score_directions(sim_anchor, sim_plain, sim_subjects[:, :2])
