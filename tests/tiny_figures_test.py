"""The figure functions measured on stand-ins whose answers are known, so each can fail."""

import numpy as np
import pytest

from gal_jax import tiny_figures, tiny_world


class WorldOracleScorer:
    """Embeds a caption and a picture of the world as the one-hot code of its attributes: a CLIP
    that knows the world's truth (pictures are looked up by their bytes)."""

    def __init__(self, scenes, corrupt: str | None = None):
        self.truth = {s.image.tobytes(): s for s in scenes}
        self.corrupt = corrupt  # an attribute this scorer gets wrong on every picture

    @staticmethod
    def code(context, obj, colour):
        parts = []
        for value, labels in ((context, tiny_world.CONTEXTS), (obj, tiny_world.OBJECTS), (colour, tiny_world.COLOURS)):
            parts.append(np.eye(len(labels))[labels.index(value)])
        vector = np.concatenate(parts)
        return vector / np.linalg.norm(vector)

    def text_embeddings(self, prompts):
        rows = []
        for prompt in prompts:
            words = prompt.split(" ")
            colour, obj = words[1], words[2]
            rows.append(self.code(" ".join(words[3:]), obj, colour))
        return np.stack(rows)

    def image_embeddings(self, images):
        rows = []
        for image in np.asarray(images):
            scene = self.truth[image.tobytes()]
            values = {"context": scene.context, "object": scene.object, "colour": scene.colour}
            if self.corrupt:
                labels = tiny_figures.LABELS[self.corrupt]
                values[self.corrupt] = labels[(labels.index(values[self.corrupt]) + 1) % len(labels)]
            rows.append(self.code(values["context"], values["object"], values["colour"]))
        return np.stack(rows)


@pytest.fixture(scope="module")
def scenes():
    return tiny_figures.held_out_scenes(60)


def test_held_out_scenes_are_reproducible_and_not_the_pretraining_ones(scenes):
    again = tiny_figures.held_out_scenes(60)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(scenes, again))
    train = {s.image.tobytes() for s in tiny_world.training_set(60)}
    assert not train & {s.image.tobytes() for s in scenes}
    assert all(s.style is None for s in scenes)


def test_zero_shot_of_an_oracle_is_perfect_and_the_judge_checks_it(scenes):
    result = tiny_figures.clip_zero_shot(WorldOracleScorer(scenes), scenes)
    assert result["images"] == 60
    for name in tiny_figures.ATTRIBUTES:
        assert result[name]["clip_accuracy"] == 1.0
        assert result[name]["judge_agrees_with_clip"] == result[name]["judge_accuracy"]
    assert result["context"]["judge_accuracy"] >= 0.95


def test_a_scorer_wrong_about_one_attribute_scores_zero_there_and_the_judge_disagrees(scenes):
    result = tiny_figures.clip_zero_shot(WorldOracleScorer(scenes, corrupt="context"), scenes)
    assert result["context"]["clip_accuracy"] == 0.0 and result["object"]["clip_accuracy"] == 1.0
    assert result["context"]["judge_agrees_with_clip"] <= 0.05


def test_caption_grid_covers_the_world_context_major():
    captions, shape = tiny_figures.caption_grid()
    assert shape == (len(tiny_world.CONTEXTS), len(tiny_world.OBJECTS), len(tiny_world.COLOURS))
    assert len(set(captions)) == np.prod(shape)
    assert captions[0] == tiny_world.caption(tiny_world.OBJECTS[0], tiny_world.COLOURS[0], "plain", tiny_world.CONTEXTS[0])


class DrawingGenerator:
    """A text-to-image model that draws its prompt's context faithfully for the first `good`
    contexts and the reference table for the rest."""

    settings = {"sampler": "world", "steps": 0, "guidance_scale": 1.0}

    def __init__(self, good: int):
        self.good = good

    def generate(self, params, prompts, prompt_ids, round_index, num_per_prompt, seed, **kwargs):
        rng = np.random.default_rng(seed)
        contexts = list(dict.fromkeys(tiny_world.prompt_context(p) for p in prompts))
        return np.stack([
            tiny_world.sample_scene(rng, context=c if contexts.index(c) < self.good else tiny_world.REFERENCE_CONTEXT).image
            for c in (tiny_world.prompt_context(p) for p in prompts) for _ in range(num_per_prompt)
        ])


def test_base_context_following_counts_per_context():
    result = tiny_figures.base_context_following(DrawingGenerator(good=15), None, per_context=4)
    shares = result["per_context"]
    assert list(shares) == list(tiny_world.ANCHOR_CONTEXTS)
    assert min(shares[c] for c in tiny_world.ANCHOR_CONTEXTS[:15]) >= 0.75
    assert max(shares[c] for c in tiny_world.ANCHOR_CONTEXTS[15:]) == 0.0 and result["min"] == 0.0


def test_context_prompts_name_their_context():
    prompts = tiny_figures.context_prompts(["on the moon", "in desert"], 3)
    assert [tiny_world.prompt_context(p) for p in prompts] == ["on the moon"] * 3 + ["in desert"] * 3


def test_judged_context_accuracy_and_prompts_without_a_context():
    rng = np.random.default_rng(0)
    images = np.stack([tiny_world.sample_scene(rng, context="on the beach").image for _ in range(4)])
    assert tiny_figures.judged_context_accuracy(images, ["teapot on the beach"] * 4) == 1.0
    assert tiny_figures.judged_context_accuracy(images, ["teapot on the moon"] * 4) == 0.0
    with pytest.raises(ValueError, match="names no context"):
        tiny_figures.judged_context_accuracy(images[:1], ["a teapot"])


def test_table_lists_each_mode_and_round():
    row = tiny_figures.RoundFigures(round=1, txt_aln=0.25, img_aln=0.8, ovf=0.5, judge_context=0.4, num_references=4)
    text = tiny_figures.table({"none": [row], "uncertainty": [row, tiny_figures.RoundFigures(2, 0.3, 0.79, 0.2, 0.7, 7)]})
    lines = text.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| none | 1 | 4 |") and "| 0.200 | 0.700 |" in lines[4]


def test_oracle_agreement_compares_the_overfit_flags_with_the_judges_table():
    rng = np.random.default_rng(3)
    table = [tiny_world.sample_scene(rng, context=tiny_world.REFERENCE_CONTEXT).image for _ in range(3)]
    beach = [tiny_world.sample_scene(rng, context="on the beach").image for _ in range(5)]
    images = table + beach
    right = tiny_figures.oracle_agreement(images, [True] * 3 + [False] * 5)
    assert right == {"images": 8, "oracle_overfit": 3 / 8, "judge_reference_context": 3 / 8, "agree": 1.0,
                     "oracle_finds": 1.0}
    # An oracle that misses two of the tables and flags one beach.
    blind = tiny_figures.oracle_agreement(images, [True, False, False, True] + [False] * 4)
    assert blind["agree"] == 5 / 8 and blind["oracle_finds"] == 1 / 3 and blind["oracle_overfit"] == 2 / 8
    assert np.isnan(tiny_figures.oracle_agreement(beach, [False] * 5)["oracle_finds"])
    with pytest.raises(ValueError, match="8 images but 7 overfit flags"):
        tiny_figures.oracle_agreement(images, [True] * 7)
    text = tiny_figures.oracle_table({"uncertainty": [{"round": 1, **right}]})
    assert text.splitlines()[2] == "| uncertainty | 1 | 8 | 0.375 | 0.375 | 1.000 | 1.000 |"


@pytest.mark.parametrize("method", ["textual_inversion", "lora"])
def test_comparison_evaluates_the_rounds_of_every_method(method, tiny_world_assets, tmp_path, monkeypatch):
    """The figures read each round's result as its method left it (a new token: the round's own
    tokenizer; LoRA: merged deltas), not only DreamBooth's UNet folder; round 1, the same for every
    feedback mode, is trained once."""
    from configs import tiny_world as tiny_world_config
    from gal_jax import trainer

    config = tiny_world_config.get_config(method)
    config.model.tiny_dir = str(tiny_world_assets["root"])
    config.train.steps, config.train.checkpoint_every = 2, 2
    config.sample.steps, config.sample.num_per_prompt = 2, 2
    config.gal.rounds, config.eval.steps = 2, 2
    config.train.batch_size = 8  # over the 8 fake test devices
    trained = []
    train_round = trainer.Trainer.train_round
    monkeypatch.setattr(trainer.Trainer, "train_round",
                        lambda self, *args, **kwargs: trained.append(kwargs.get("desc")) or train_round(self, *args, **kwargs))
    result = tiny_figures.run_comparison(tmp_path, config, ["none", "uncertainty"], num_per_prompt=1, progress=False)
    rounds = [r["round"] for r in result["runs"]["uncertainty"]]
    assert rounds and rounds[0] == 1 and [r["round"] for r in result["base"]] == [0]
    assert result["table"].count("| uncertainty |") == len(rounds)
    # The CLIP oracle against the judge on every scored round's pictures (a last round that only
    # trains has none; a run that stops early scored its last round).
    oracle = result["oracle"]["uncertainty"]
    assert oracle[0]["round"] == 1 and oracle[0]["images"] == 18 * config.sample.num_per_prompt
    assert [r["round"] for r in oracle] in (rounds, rounds[:-1])
    assert result["oracle_table"].count("| uncertainty |") == len(oracle)
    # The personalized model is not the base one: its pictures, and so its scores, differ.
    first = result["runs"]["uncertainty"][0]
    assert (first["txt_aln"], first["img_aln"]) != (result["base"][0]["txt_aln"], result["base"][0]["img_aln"])
    # Round 1 came from the `none` run: not trained again, the same files, the same figures.
    assert trained == ["round 1 train"] + [f"round {r} train" for r in rounds[1:]]
    result_dir = "personalization"
    for shared in (tmp_path / "none" / "rounds" / "1" / result_dir).rglob("*"):
        if shared.is_file():
            copy = tmp_path / "uncertainty" / "rounds" / "1" / result_dir / shared.relative_to(
                tmp_path / "none" / "rounds" / "1" / result_dir)
            assert copy.read_bytes() == shared.read_bytes()
    assert result["runs"]["none"][0] == first
