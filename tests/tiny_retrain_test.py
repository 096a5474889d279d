"""gal_jax/tiny_retrain.py: training sets retrained across seeds and evaluated as figures 3-4."""

import math

import pytest

from gal_jax import data, models, tiny_retrain


def test_a_train_set_is_named_by_its_folder_or_its_round(tmp_path):
    (tmp_path / "rounds" / "4" / "train_set").mkdir(parents=True)
    (tmp_path / "set").mkdir()
    sets = tiny_retrain.parse_train_sets([f"r4={tmp_path}/rounds/4", f"own={tmp_path}/set"])
    assert sets == {"r4": tmp_path / "rounds" / "4" / "train_set", "own": tmp_path / "set"}


@pytest.mark.parametrize("spec, message", [
    ("no_equals", "expected NAME=FOLDER"),
    ("=somewhere", "expected NAME=FOLDER"),
    ("name=", "expected NAME=FOLDER"),
    ("a={missing}", "is not a folder"),
])
def test_bad_train_set_specs_are_refused_naming_them(spec, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        tiny_retrain.parse_train_sets([spec.format(missing=tmp_path / "missing")])


def test_a_name_given_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'a' is given twice"):
        tiny_retrain.parse_train_sets([f"a={tmp_path}", f"a={tmp_path}"])


def test_table_has_a_row_per_set_and_seed_and_each_sets_mean():
    row = dict(txt_aln=0.2, img_aln=0.1, judge_context=0.5)
    rows = [{"set": "refs", "seed": 0, "ovf": 0.25, **row}, {"set": "refs", "seed": 1, "ovf": 0.75, **row},
            {"set": "round_4", "seed": 0, "ovf": 1.0, **row}]
    lines = tiny_retrain.table(rows).splitlines()
    assert lines[2] == "| refs | 0 | 0.200 | 0.100 | 0.250 | 0.500 |"
    assert lines[5] == "| **refs** | mean of 2 | 0.200 | 0.100 | 0.500 | 0.500 |"
    assert lines[6] == "| **round_4** | mean of 1 | 0.200 | 0.100 | 1.000 | 0.500 |"


def test_retrain_trains_every_set_under_every_seed_and_evaluates_it(tiny_world_assets, tmp_path, monkeypatch):
    from configs import tiny_world as tiny_world_config
    from gal_jax import trainer

    # LoRA: its step compiles in a fraction of the whole UNet's, and a method other than
    # DreamBooth's has to reach the evaluated model too (its deltas merged).
    config = tiny_world_config.get_config("lora")
    config.model.tiny_dir = str(tiny_world_assets["root"])
    config.train.steps, config.train.log_every = 2, 1
    config.eval.steps = 2
    sd, _ = models.load_stable_diffusion(tiny_world_assets["sd"])
    references = data.load_concept(tiny_world_assets["object_concept"])
    class_images = data.list_class_images(tiny_world_assets["reg_dir"])
    sets = {}
    for name, refs in (("all", references), ("first_two", references[:2])):
        sets[name] = data.write_training_set(refs, class_images, "a teapot", tmp_path / name, sd.tokenize, 64)
    seeds = []  # each seed builds its own trainer (and compiles its step): one seed keeps this test short
    init = trainer.Trainer.__init__
    monkeypatch.setattr(trainer.Trainer, "__init__",
                        lambda self, config, *args: seeds.append(config.train.seed) or init(self, config, *args))
    rows = tiny_retrain.retrain(config, sets, [3], num_per_prompt=1, progress=False)
    assert seeds == [3] and config.train.seed == 0  # the caller's config is left as it was
    assert [(r["set"], r["seed"]) for r in rows] == [("all", 3), ("first_two", 3)]
    for r in rows:
        assert 0.0 <= r["ovf"] <= 1.0 and 0.0 <= r["judge_context"] <= 1.0
        assert all(math.isfinite(r[c]) for c in ("txt_aln", "img_aln", "train_loss"))
    assert rows[0]["train_loss"] != rows[1]["train_loss"]  # each set trained on its own pictures
