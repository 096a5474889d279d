"""The GAL loop end to end on the tiny default: records, resume, feedback modes."""

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny_cpu
from gal_jax import acquisition, driver, io_utils, sample
from gal_jax import trainer as trainer_lib


def small_config(tiny_assets, **overrides):
    """Returns the tiny CPU config shrunk for tests (few steps, 8-way batch over 8 fake devices)."""
    config = tiny_cpu.get_config()
    config.model.tiny_dir = str(tiny_assets["root"])
    config.train.steps = 3
    config.train.batch_size = 8
    config.train.checkpoint_every = 2
    config.sample.steps = 2
    config.sample.num_per_prompt = 4
    config.sample.max_images_per_device = 4
    config.gal.k = 2
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        setattr(config[section], field, value)
    return config


def read_records(workdir):
    """Returns the workdir's records as the JSON dicts their files hold."""
    return [record.to_json() for record in driver.read_records(workdir)]


def records_without_timings(workdir):
    return [{k: v for k, v in r.items() if k != "timings"} for r in read_records(workdir)]


def assert_record_follows_acquisition_math(record):
    """Recomputes every decision of a query round from its record alone."""
    directions = record["directions"]
    sim_anchor = np.array([[i["sim_anchor"] for i in d["images"]] for d in directions])
    sim_plain = np.array([[i["sim_plain"] for i in d["images"]] for d in directions])
    scores = acquisition.score_directions(sim_anchor, sim_plain)
    for d, direction in enumerate(directions):
        assert [i["overfit"] for i in direction["images"]] == scores.flags[d].tolist()
        assert direction["overfit_rate"] == pytest.approx(scores.rates[d])
        assert direction["entropy"] == pytest.approx(scores.entropies[d])
    selection = acquisition.select_queries(scores, record["k"], record["lambda"], record["balance"])
    assert record["openness"] == pytest.approx(record["lambda"] * scores.entropies.mean())
    assert record["stopped"] == selection.stopped
    expected = [
        (directions[d]["prompt"], directions[d]["images"][i]["path"])
        for d, i in zip(selection.directions, selection.images)
    ]
    assert [(s["prompt"], s["image"]) for s in record["selected"]] == expected
    for s in record["selected"]:
        assert s["weight"] == pytest.approx(record["openness"] if record["balance"] else 1.0)


@pytest.fixture(scope="module")
def uncertainty_run(tiny_assets, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uncertainty")
    config = small_config(tiny_assets)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(driver, "run_round", counting_executables(driver.run_round, BUILT_PER_ROUND))
        report = driver.run(config, workdir)
    return config, workdir, report


BUILT_PER_ROUND: dict[int, list[str]] = {}  # the uncertainty run's XLA executables, by round


def counting_executables(run_round, built: dict):
    """Wraps driver.run_round to keep the names of the executables each round built."""

    def run(runtime, round_index, *args, **kwargs):
        before = len(io_utils.executables_built())
        record = run_round(runtime, round_index, *args, **kwargs)
        built[round_index] = io_utils.executables_built()[before:]
        return record

    return run


def test_the_loops_functions_compile_once_for_the_whole_run(uncertainty_run):
    """Train step, state init, latent and text encoders, the sampler chunk and CLIP's batch are
    built in round 1 only; later rounds rebuild only the small helpers whose shapes follow the
    image grid, which shrinks as prompts are queried; the last round (training only) builds none."""
    heavy = {"jit(train_step)", "jit(_new_state)", "jit(encode_posterior)", "jit(encode_text)",
             "jit(_chunk)", "jit(_traced_embed_images)"}
    assert sorted(BUILT_PER_ROUND) == [1, 2, 3]
    every = [name for names in BUILT_PER_ROUND.values() for name in names]
    assert {"jit(train_step)", "jit(_chunk)"} <= set(BUILT_PER_ROUND[1])
    assert all(every.count(name) <= 1 for name in heavy), BUILT_PER_ROUND
    assert not heavy & set(BUILT_PER_ROUND[2]), BUILT_PER_ROUND[2]
    assert BUILT_PER_ROUND[3] == [], BUILT_PER_ROUND[3]


def test_tiny_uncertainty_balance_run_writes_consistent_records(uncertainty_run):
    config, workdir, report = uncertainty_run
    records = read_records(workdir)
    assert report.exists() and report.name == "report.html"
    assert 1 <= len(records) <= config.gal.rounds
    pool = set(range(18))
    for record in records:
        assert record["feedback"] == "uncertainty" and record["balance"] is True
        assert "train" in record["timings"]
        if record["directions"]:
            assert set(record["timings"]) >= {"generate", "score", "write"}
        for direction in record["directions"]:
            for image in direction["images"]:
                assert (workdir / image["path"]).is_file()
        scored = {d["prompt_id"] for d in record["directions"]}
        if record["directions"]:
            assert scored == pool
            assert_record_follows_acquisition_math(record)
        pool -= {s["prompt_id"] for s in record["selected"]}
    # References grow by exactly what each round selected, with the round's weight.
    for previous, record in zip(records, records[1:]):
        added = record["references"][len(previous["references"]) :]
        assert record["references"][: len(previous["references"])] == previous["references"]
        assert [(a["prompt"], a["weight"], a["source"]) for a in added] == [
            (s["prompt"], s["weight"], f"round-{previous['round']}") for s in previous["selected"]
        ]
    last = records[-1]
    assert last["stopped"] or (last["round"] == config.gal.rounds and last["directions"] == [])


def test_rerunning_a_finished_run_redoes_nothing(uncertainty_run, monkeypatch):
    config, workdir, _ = uncertainty_run
    before = records_without_timings(workdir)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished round was trained again")

    monkeypatch.setattr(driver, "train_round", no_training)
    driver.run(config, workdir)
    assert records_without_timings(workdir) == before


def test_kill_after_generation_in_round_two_resumes_to_the_same_records(
    uncertainty_run, tiny_assets, tmp_path, monkeypatch
):
    config, reference_dir, _ = uncertainty_run
    expected = records_without_timings(reference_dir)
    if len(expected) < 2 or not expected[1]["directions"]:
        pytest.skip("the reference run stopped before querying in round 2")
    workdir = tmp_path / "killed"
    real_score = driver.score_images

    def crash_in_round_two(runtime, images, prompts, paths):
        if paths.index == 2:
            raise RuntimeError("injected crash after generation")
        return real_score(runtime, images, prompts, paths)

    monkeypatch.setattr(driver, "score_images", crash_in_round_two)
    with pytest.raises(RuntimeError, match="injected crash"):
        driver.run(small_config(tiny_assets), workdir)
    assert (workdir / "rounds" / "2" / "generated.json").exists()
    assert not (workdir / "rounds" / "2" / "record.json").exists()
    monkeypatch.setattr(driver, "score_images", real_score)
    generated = workdir / "rounds" / "2" / "generated.json"
    written = generated.stat().st_mtime_ns
    driver.run(small_config(tiny_assets), workdir)
    assert records_without_timings(workdir) == expected
    assert generated.stat().st_mtime_ns == written, "round 2's images were generated again"


def test_changed_config_on_resume_is_refused(uncertainty_run, tiny_assets):
    _, workdir, _ = uncertainty_run
    changed = small_config(tiny_assets, gal__openness_lambda=0.01)
    with pytest.raises(driver.ConfigChangedError, match=r"gal.openness_lambda \(0.005 -> 0.01\)"):
        driver.run(changed, workdir)


def test_style_concept_runs_without_prior(tiny_assets, tmp_path):
    config = small_config(tiny_assets, data__kind="style", gal__rounds=2)
    driver.run(config, tmp_path)
    records = read_records(tmp_path)
    first = records[0]
    assert first["concept_phrase"] == "in watercolor painting style"
    assert all(r["plain_prompt"] is None for r in first["references"])
    if first["directions"]:
        assert first["directions"][0]["prompt"].endswith("in watercolor painting style")
        assert_record_follows_acquisition_math(first)


def test_random_feedback_takes_a_seeded_random_image_or_with_best_the_highest_sim_anchor(tiny_assets, tmp_path):
    """The paper's random baseline: k random directions, one random image each (fixed by gal.seed,
    round and direction), recomputed here from the record and the seed; `random_image="best"` keeps
    the directions and takes each one's highest-sim_anchor image instead."""
    first_rounds = {}
    for rule in ("random", "best"):
        config = small_config(tiny_assets, gal__feedback="random", gal__rounds=2, gal__seed=5,
                              gal__random_image=rule)
        driver.run(config, tmp_path / rule)
        first = read_records(tmp_path / rule)[0]
        assert first["tie_break"] == "pool order"
        assert first["image_rule"] == ("random (seed 5)" if rule == "random" else "highest sim_anchor")
        directions = first["directions"]
        assert len(directions) == 18 and first["openness"] == pytest.approx(
            first["lambda"] * np.mean([d["entropy"] for d in directions]))
        chosen = acquisition.random_directions(len(directions), config.gal.k, 5, first["round"])
        expected = []
        for d in chosen:
            images = directions[d]["images"]
            if rule == "random":
                picked = acquisition.random_image(len(images), 5, first["round"], directions[d]["prompt_id"])
            else:
                picked = int(np.argmax([image["sim_anchor"] for image in images]))
            expected.append((directions[d]["prompt_id"], images[picked]["path"]))
        assert [(s["prompt_id"], s["image"]) for s in first["selected"]] == expected
        first_rounds[rule] = first
    # Same seed, same generated grid and scores: only the image rule differs.
    assert first_rounds["random"]["directions"] == first_rounds["best"]["directions"]


def test_none_feedback_is_one_round_of_plain_dreambooth(tiny_assets, tmp_path):
    driver.run(small_config(tiny_assets, gal__feedback="none"), tmp_path)
    records = read_records(tmp_path)
    assert len(records) == 1
    assert records[0]["directions"] == [] and records[0]["selected"] == []
    assert not (tmp_path / "rounds" / "1" / "generated.json").exists()


def test_training_on_part_of_the_mesh_trains_the_same_model_and_generates_on_all_of_it(tiny_assets, tmp_path,
                                                                                        monkeypatch):
    """config.mesh.train_devices: the trainer gets the first devices, generation and scoring the
    whole mesh; the trained model is the one the whole mesh trains (up to the gradient's summation
    order)."""
    meshes = {}
    for name, cls in (("trainer", trainer_lib.Trainer), ("generator", sample.Generator)):
        init = cls.__init__

        def spy(self, *args, _init=init, _name=name, **kwargs):
            _init(self, *args, **kwargs)
            meshes[_name] = self.mesh

        monkeypatch.setattr(cls, "__init__", spy)
    losses = {}
    for devices in (2, 0):
        config = small_config(tiny_assets, gal__feedback="none", mesh__train_devices=devices)
        driver.run(config, tmp_path / str(devices))
        losses[devices] = [point["loss"] for point in read_records(tmp_path / str(devices))[0]["train_loss"]]
        assert meshes["generator"].devices.size == 8
        assert meshes["trainer"].devices.size == (devices or 8)
    assert losses[2] and losses[2] == pytest.approx(losses[0], rel=1e-4)


def test_human_feedback_waits_for_selections_then_resumes(tiny_assets, tmp_path):
    config = small_config(tiny_assets, gal__feedback="human", gal__rounds=2)
    with pytest.raises(driver.AwaitingHumanFeedback, match="review.html"):
        driver.run(config, tmp_path)
    round_one = tmp_path / "rounds" / "1"
    assert (round_one / "review.html").exists()
    assert read_records(tmp_path) == []
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "awaiting_feedback"
    generated = json.loads((round_one / "generated.json").read_text())
    picks = [generated[0], generated[4 * 5 + 1]]
    (round_one / "selections.json").write_text(json.dumps({
        "round": 1,
        "selected": [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "image": p["path"]} for p in picks],
    }))
    driver.run(config, tmp_path)
    records = read_records(tmp_path)
    assert [(s["prompt_id"], s["image"]) for s in records[0]["selected"]] == [
        (p["prompt_id"], p["path"]) for p in picks
    ]
    assert records[1]["references"][-2:] == [
        {"image": p["path"], "prompt": p["prompt"], "plain_prompt": None,
         "weight": records[0]["openness"], "source": "round-1"}
        for p in picks
    ]


def test_bad_feedback_mode_is_named(tiny_assets, tmp_path):
    with pytest.raises(ValueError, match="config.gal.feedback='oracle'"):
        driver.run(small_config(tiny_assets, gal__feedback="oracle"), tmp_path)


def real_paths_config(tiny_assets, **overrides):
    """Returns the small config naming the tiny assets as real paths (no tiny default involved)."""
    config = small_config(tiny_assets, **overrides)
    config.model.sd_path = str(tiny_assets["sd"])
    config.model.clip_path = str(tiny_assets["clip"])
    config.data.concept_dir = str(tiny_assets["object_concept"])
    config.data.class_dir = str(tiny_assets["reg_dir"])
    return config


def test_missing_concept_folder_is_named(tiny_assets, tmp_path):
    config = real_paths_config(tiny_assets)
    config.data.concept_dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"config.data.concept_dir=.*nowhere.*: no such folder"):
        driver.run(config, tmp_path / "work")


def test_a_partial_set_of_real_paths_is_refused_naming_the_missing_one(tiny_assets, tmp_path):
    config = small_config(tiny_assets)
    config.model.sd_path = str(tiny_assets["sd"])  # but no clip_path, no concept_dir
    with pytest.raises(ValueError, match=r"config.model.clip_path, config.data.concept_dir is empty, but "
                                         r"config.model.sd_path is set"):
        driver.run(config, tmp_path / "work")
    assert not (tmp_path / "work" / "rounds").exists()


def test_human_feedback_with_nothing_selected_stops_the_run(tiny_assets, tmp_path):
    config = small_config(tiny_assets, gal__feedback="human", gal__rounds=3)
    with pytest.raises(driver.AwaitingHumanFeedback):
        driver.run(config, tmp_path)
    (tmp_path / "rounds" / "1" / "selections.json").write_text(json.dumps({"round": 1, "selected": []}))
    driver.run(config, tmp_path)
    records = read_records(tmp_path)
    assert len(records) == 1 and records[0]["stopped"] and records[0]["selected"] == []


def test_evaluation_after_each_round_is_recorded_and_reported(tiny_assets, tmp_path):
    config = small_config(tiny_assets, gal__feedback="none", eval__enabled=True)
    driver.run(config, tmp_path)
    results = json.loads((tmp_path / "rounds" / "1" / "eval.json").read_text())
    assert [r["round"] for r in results] == [1]
    assert {"txt_aln", "img_aln", "ovf"} <= set(results[0])
    # config.eval's protocol, not the loop's sampler (config.sample: ddim, 2 steps, seed 0).
    e = config.eval
    assert results[0]["settings"] == {"txt_scale": 1.0, "num_per_prompt": e.num_per_prompt, "seed": 8888,
                                      "sampler": "pndm", "steps": e.steps, "guidance_scale": 7.5}
    assert results[0]["settings"] == driver.eval_settings(config)  # what a resume checks the cache against
    assert results[0]["counts"]["images"] == results[0]["counts"]["prompts"] * e.num_per_prompt
    assert 0.0 <= results[0]["ovf"] <= 1.0
    assert "txt_aln" in (tmp_path / "report.html").read_text()


def test_a_finished_run_leaves_round_unets_and_its_final_model_not_training_states(uncertainty_run):
    config, workdir, _ = uncertainty_run
    records = read_records(workdir)
    for record in records:
        round_dir = workdir / "rounds" / str(record["round"])
        assert (round_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert not (round_dir / "checkpoints").exists(), "training states outlive the round's UNet"
    status = json.loads((workdir / "run.json").read_text())
    assert status == {"status": "complete", "final_round": records[-1]["round"], "model": "model",
                      "report": "report.html"}
    from gal_jax import export, models

    sd, params = models.load_stable_diffusion(workdir / "model")
    final = export.load_unet(sd, workdir / "rounds" / str(records[-1]["round"]) / "unet")
    exported = jax.tree_util.tree_leaves(params.unet)
    # export.dtype float16: the model holds the final round's UNet at half precision.
    for ours, theirs in zip(exported, jax.tree_util.tree_leaves(final)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs).astype(np.float16).astype(np.float32))


def test_rerun_of_a_complete_workdir_loads_no_model(uncertainty_run, monkeypatch, capsys):
    config, workdir, _ = uncertainty_run

    def no_models(*args, **kwargs):
        raise AssertionError("a complete workdir loaded its models again")

    monkeypatch.setattr(driver, "build_runtime", no_models)
    assert driver.run(config, workdir) == workdir / "report.html"
    assert "complete, nothing to do" in capsys.readouterr().out


def test_a_changed_input_file_is_refused_on_resume(tiny_assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_assets["object_concept"], data / "concept")
    config = real_paths_config(tiny_assets, gal__feedback="none")
    config.data.concept_dir = str(data / "concept")
    driver.run(config, tmp_path / "work")
    image = sorted((data / "concept").glob("*.jpg"))[0]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    with pytest.raises(ValueError, match=rf"inputs.json: the inputs changed .*{image.name} \(changed\)"):
        driver.run(config, tmp_path / "work")


def test_a_cache_file_that_does_not_match_its_round_is_refused(tiny_assets, tmp_path):
    config = small_config(tiny_assets, gal__feedback="human")
    with pytest.raises(driver.AwaitingHumanFeedback):
        driver.run(config, tmp_path)
    generated = tmp_path / "rounds" / "1" / "generated.json"
    index = json.loads(generated.read_text())
    index[3]["prompt"] = "a teapot somewhere else"
    generated.write_text(json.dumps(index))
    (tmp_path / "rounds" / "1" / "selections.json").write_text(json.dumps({"round": 1, "selected": []}))
    with pytest.raises(ValueError, match="generated.json: does not index this round's grid"):
        driver.run(config, tmp_path)


def test_an_eval_json_made_under_another_protocol_is_refused(tmp_path):
    config = small_config({"root": tmp_path}, eval__enabled=True)
    settings = driver.eval_settings(config)
    driver._check_eval_settings([{"settings": settings}], settings, tmp_path / "eval.json")
    old = {"txt_scale": 1.0, "num_per_prompt": 1, "seed": 0}  # before config.eval had its own sampler
    with pytest.raises(driver.WorkdirError, match="eval.json: evaluated with settings .*delete it"):
        driver._check_eval_settings([{"settings": settings}, {"settings": old}], settings, tmp_path / "eval.json")


def test_an_unknown_random_image_rule_is_refused_before_any_model_loads(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "load_sd", lambda *args: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="config.gal.random_image='first'"):
        driver.run(small_config(tiny_assets, gal__feedback="random", gal__random_image="first"), tmp_path)


def test_a_second_run_on_a_locked_workdir_exits_naming_the_holder(tiny_assets, tmp_path):
    from gal_jax.workdir import Workdir, WorkdirBusyError

    tmp_path.mkdir(exist_ok=True)
    with Workdir(tmp_path).lock("gal-jax run --workdir=elsewhere"):
        with pytest.raises(WorkdirBusyError, match=rf"in use by pid {os.getpid()} \(gal-jax run"):
            driver.run(small_config(tiny_assets), tmp_path)


def test_a_workdir_of_the_first_landing_resumes_and_exports_from_its_checkpoint(tiny_assets, tmp_path):
    """The first landing kept each round's UNet only in its orbax checkpoint, wrote records without
    schema_version, no inputs.json or run.json, and a config without the fields added since."""
    config = small_config(tiny_assets, gal__feedback="none", train__keep_training_state=True)
    driver.run(config, tmp_path)
    assert (tmp_path / "rounds" / "1" / "checkpoints").is_dir(), "keep_training_state keeps them"
    shutil.rmtree(tmp_path / "model")
    shutil.rmtree(tmp_path / "rounds" / "1" / "unet")
    for name in ("run.json", "inputs.json"):
        (tmp_path / name).unlink()
    record_file = tmp_path / "rounds" / "1" / "record.json"
    record_file.write_text(json.dumps({k: v for k, v in json.loads(record_file.read_text()).items()
                                       if k != "schema_version"}))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["export"], saved["train"]["keep_training_state"], saved["train"]["save_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(saved))

    resumed = small_config(tiny_assets, gal__feedback="none")  # the new fields at their defaults
    driver.run(resumed, tmp_path)
    assert driver.read_records(tmp_path)[0].schema_version == 1
    assert (tmp_path / "rounds" / "1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "rounds" / "1" / "checkpoints").exists()
    changed = small_config(tiny_assets, gal__feedback="none", train__save_dtype="bfloat16")
    with pytest.raises(driver.ConfigChangedError, match=r"train.save_dtype \(None -> 'bfloat16'\)"):
        driver.run(changed, tmp_path)


def readme_workdir_paths() -> list[str]:
    """Returns the paths README's "What a run leaves in DIR" block names (the always-present ones)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## What a run leaves in `DIR`", 1)[1]
    block = section.split("```", 2)[1]
    paths = []
    for line in block.splitlines():
        if line and not line.startswith(" "):
            names = line.split("  ", 1)[0]
            first, *others = [name.strip() for name in names.split(",")]
            folder = first.rsplit("/", 1)[0] + "/" if "/" in first.rstrip("/") else ""
            paths += [first, *(folder + other for other in others)]
    return paths


def test_every_path_the_readme_names_exists_after_the_tiny_run(uncertainty_run):
    _, workdir, _ = uncertainty_run
    names = readme_workdir_paths()
    assert "model/" in names and "rounds/<r>/record.json" in names and len(names) >= 12
    for name in names:
        pattern = name.replace("<r>", "1").rstrip("/")
        assert list(workdir.glob(pattern)), f"README names {name}, absent after the tiny run"


def test_cached_scores_must_hold_the_identity_check_the_run_makes(tmp_path):
    sims = {"prompts": ["p"], "plain_prompts": ["q"], "sim_anchor": [0.1, 0.2], "sim_plain": [[0.3], [0.1]]}
    path = tmp_path / "scores.json"
    driver._check_scores(sims, ["p"], ["q"], 2, path)
    with pytest.raises(driver.WorkdirError, match="scores.json: it lacks the identity check's sim_subjects"):
        driver._check_scores(sims, ["p"], ["q"], 2, path, subjects=2)
    checked = {**sims, "sim_subjects": np.zeros((2, 2, 2)).tolist()}
    driver._check_scores(checked, ["p"], ["q"], 2, path, subjects=2)
    with pytest.raises(driver.WorkdirError, match="holds an identity check this run does not make"):
        driver._check_scores(checked, ["p"], ["q"], 2, path)


def test_identity_check_is_checked_in_the_config_and_needs_several_subjects(tiny_assets):
    from gal_jax import concept as concept_lib

    config = tiny_cpu.get_config()
    config.gal.identity_check = "dino"
    with pytest.raises(ValueError, match=r"config.gal.identity_check='dino'; expected one of \('none', 'clip'\)"):
        driver.check_config(config)
    config.gal.identity_check = "clip"
    with pytest.raises(ValueError, match="identity_check='clip' checks the subjects of a multi-subject concept"):
        concept_lib.load_concept(config, tiny_assets["object_concept"], None)


def _shipped_configs():
    import importlib.util

    for path in sorted(Path(__file__).parent.parent.glob("configs/*.py")):
        spec = importlib.util.spec_from_file_location(f"shipped_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "get_config"):
            yield path.name, module.get_config()
            for variant in getattr(module, "METHODS", ()):
                yield f"{path.name}:{variant}", module.get_config(variant)


def test_every_shipped_config_passes_the_config_check():
    """check_config now runs the trainer's checks of every stage: none of ours may trip them."""
    names = []
    for name, config in _shipped_configs():
        driver.check_config(config)
        names.append(name)
    assert "tiny_world.py:attndreambooth" in names and "sd15_object.py" in names, names


def test_a_stage_setting_is_checked_before_the_run_and_named_by_its_stage():
    from configs import tiny_world

    config = tiny_world.get_config("attndreambooth")
    config.train.stages.s2_attention.batch_size = 0
    with pytest.raises(ValueError, match=r"train.stages.s2_attention.batch_size must be a positive integer, got 0"):
        driver.check_config(config)
    config = tiny_world.get_config("attndreambooth")
    config.train.stages.s3_unet.warmup_steps = 10**6
    with pytest.raises(ValueError, match=r"train.stages.s3_unet.warmup_steps=1000000 must lie in "
                                         r"\[0, train.stages.s3_unet.steps=200\]"):
        driver.check_config(config)
    # The optimizer's and the step's own checks name the stage too.
    for field, value, message in (("max_grad_norm", -1.0, "train.stages.s1_inversion.max_grad_norm=-1.0 must be >= 0"),
                                  ("prior_loss_weight", -1.0, "train.stages.s1_inversion.prior_loss_weight must be >= 0"),
                                  ("remat", "sometimes", "train.stages.s1_inversion.remat")):
        config = tiny_world.get_config("attndreambooth")
        config.train.stages.s1_inversion[field] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            driver.check_config(config)
