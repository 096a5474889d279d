"""The workdir's one owner: paths, typed round records, the lock, clean-up of a killed run's leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from gal_jax import io_utils
from gal_jax import workdir as workdir_lib
from gal_jax.records import SCHEMA_VERSION, Direction, ImageScore, RecordError, RoundRecord, from_json
from gal_jax.workdir import Workdir, WorkdirBusyError, WorkdirError

V1_RECORD = {  # as the first landing wrote it: no schema_version
    "round": 1, "feedback": "uncertainty", "balance": True, "lambda": 0.005, "k": 1,
    "concept_phrase": "a <tiny-teapot> teapot", "plain_prompts": ["a teapot on a table"],
    "references": [{"image": "/data/0.jpg", "prompt": "a <tiny-teapot> teapot on a table",
                    "plain_prompt": "a teapot on a table", "weight": 1.0, "source": "user"}],
    "directions": [{"prompt_id": 3, "prompt": "a <tiny-teapot> teapot in park", "overfit_rate": 0.5,
                    "entropy": 0.6931471805599453,
                    "images": [{"path": "rounds/1/images/p003_s00.png", "seed": 0, "sim_anchor": 0.3,
                                "sim_plain": [0.2], "overfit": False},
                               {"path": "rounds/1/images/p003_s01.png", "seed": 1, "sim_anchor": 0.1,
                                "sim_plain": [0.2], "overfit": True}]}],
    "openness": 0.0034657359027997265,
    "selected": [{"prompt_id": 3, "prompt": "a <tiny-teapot> teapot in park",
                  "image": "rounds/1/images/p003_s00.png", "weight": 0.0034657359027997265}],
    "stopped": False,
    "timings": {"train": 1.5, "generate": 2.0},
}


def test_a_first_landing_record_reads_as_schema_1_and_writes_back_as_the_current_schema():
    record = RoundRecord.from_json(V1_RECORD, "record.json")
    assert record.schema_version == 1
    assert record.openness_lambda == 0.005 and record.directions[0].images[1].overfit is True
    assert record.directions[0].images[0].sim_plain == (0.2,)
    # Fields added since read with the first landing's behaviour: pool-order ties, best image, no curve.
    assert record.to_json() == {**V1_RECORD, "schema_version": 1, "tie_break": "pool order",
                                "image_rule": "highest sim_anchor", "train_loss": []}
    fresh = RoundRecord(**{**record.__dict__, "schema_version": SCHEMA_VERSION})
    assert fresh.to_json()["schema_version"] == 2 and SCHEMA_VERSION == 3  # version 3 only with the identity check


def _with_identity_check(record: dict) -> dict:
    """Returns V1_RECORD as a version-3 record of a two-subject run with the identity check."""
    record = json.loads(json.dumps(record))
    record.update(schema_version=3, identity_check="clip", subjects=["a", "b"])
    for image, sims, mixed in zip(record["directions"][0]["images"], ([[0.9, 0.1], [0.2, 0.8]], [[0.9, 0.1], [0.8, 0.2]]),
                                  (False, True)):
        image.update(sim_subjects=sims, identity_mixed=mixed)
    return record


def test_a_record_with_the_identity_check_is_version_3_and_round_trips():
    data = _with_identity_check(V1_RECORD)
    record = RoundRecord.from_json(data, "record.json")
    assert record.schema_version == 3 and record.subjects == ("a", "b")
    assert record.directions[0].images[1].sim_subjects == ((0.9, 0.1), (0.8, 0.2))
    assert record.to_json() == {**data, "tie_break": "pool order", "image_rule": "highest sim_anchor", "train_loss": []}
    # Without the check the same record is written as version 2, without the check's fields.
    plain = RoundRecord(**{**record.__dict__, "identity_check": "none", "subjects": ()}).to_json()
    assert plain["schema_version"] == 2 and "subjects" not in plain
    assert "sim_subjects" not in plain["directions"][0]["images"][0]


def test_a_record_whose_identity_sims_do_not_match_its_subjects_is_refused():
    data = _with_identity_check(V1_RECORD)
    data["directions"][0]["images"][0]["sim_subjects"] = [[0.9, 0.1]]
    with pytest.raises(RecordError, match=r"p003_s00.png has sim_subjects that are not 2 strips x 2 subjects"):
        RoundRecord.from_json(data, "record.json")


@pytest.mark.parametrize("field, value, message", [
    ("openness", None, "field 'openness': expected a number"),
    ("stopped", 0, "field 'stopped': expected true or false"),
    ("k", True, "field 'k': expected an integer, got True"),
    ("round", 0, "round 0 must be >= 1"),
    ("schema_version", 99, "schema_version 99 is not one this gal_jax reads"),
])
def test_a_mistyped_record_field_is_named(field, value, message):
    with pytest.raises(RecordError, match=message):
        RoundRecord.from_json({**V1_RECORD, field: value}, "DIR/rounds/1/record.json")


def test_a_missing_nested_field_is_named_with_its_path():
    broken = json.loads(json.dumps(V1_RECORD))
    del broken["directions"][0]["images"][1]["sim_anchor"]
    with pytest.raises(RecordError, match=r"record.json: field 'directions'\[0\]: field 'images'\[1\]: missing field "
                                          r"'sim_anchor'"):
        RoundRecord.from_json(broken, "record.json")


def test_a_selection_of_an_unscored_direction_is_refused():
    broken = {**V1_RECORD, "selected": [{**V1_RECORD["selected"][0], "prompt_id": 9}]}
    with pytest.raises(RecordError, match="selected prompt_id 9 was not scored"):
        RoundRecord.from_json(broken)


def test_record_parts_read_on_their_own():
    image = from_json(ImageScore, V1_RECORD["directions"][0]["images"][0])
    assert image == ImageScore("rounds/1/images/p003_s00.png", 0, 0.3, (0.2,), False)
    assert from_json(Direction, V1_RECORD["directions"][0]).prompt_id == 3


def test_records_are_read_in_order_and_stop_at_the_first_unfinished_round(tmp_path):
    workdir = Workdir(tmp_path)
    record = RoundRecord.from_json(V1_RECORD)
    workdir.write_record(record)
    workdir.write_record(RoundRecord(**{**record.__dict__, "round": 2, "directions": (), "selected": ()}))
    workdir.write_record(RoundRecord(**{**record.__dict__, "round": 4, "directions": (), "selected": ()}))
    assert [r.round for r in workdir.read_records()] == [1, 2]
    assert json.loads((tmp_path / "rounds/1/record.json").read_text())["lambda"] == 0.005


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({**V1_RECORD, "round": 2}), "says round 2, but lies in the folder of round 1"),
    (json.dumps({"round": 1}), "missing field 'feedback'"),
])
def test_a_damaged_record_is_an_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "rounds" / "1" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(WorkdirError, match=message) as error:
        Workdir(tmp_path).read_records()
    assert str(path) in str(error.value) and "damaged" in str(error.value)


def test_paths_in_records_are_relative_to_the_workdir_when_inside(tmp_path):
    workdir = Workdir(tmp_path / "run")
    inside = workdir.round(2).image(7, 3)
    assert workdir.relative(inside) == "rounds/2/images/p007_s03.png"
    assert workdir.relative(tmp_path / "elsewhere.png") == str((tmp_path / "elsewhere.png").resolve())
    assert workdir.resolve("rounds/2/images/p007_s03.png") == inside
    with pytest.raises(ValueError, match="round index must be an integer >= 1"):
        workdir.round(0)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "run"
    file.write_text("")
    with pytest.raises(WorkdirError, match="--workdir is a file, not a folder"):
        Workdir(file).check_usable(create=True)


def test_an_unwritable_workdir_is_refused(tmp_path, monkeypatch):
    # Root may write into a chmod 555 folder, so the failure of the write itself is simulated.
    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(WorkdirError, match="workdir is not writable \\(Permission denied\\)"):
        Workdir(tmp_path).check_usable(create=True)


def test_an_uncreatable_workdir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match="cannot create the workdir"):
        Workdir(tmp_path / "file" / "run").check_usable(create=True)


def test_a_second_holder_of_the_lock_is_refused_naming_the_first(tmp_path):
    workdir = Workdir(tmp_path)
    with workdir.lock("gal-jax run --workdir=x"):
        with pytest.raises(WorkdirBusyError, match=rf"in use by pid {os.getpid()} \(gal-jax run --workdir=x\)"):
            workdir.lock("gal-jax review").acquire()
    with workdir.lock("gal-jax review"):  # released on exit
        pass


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from gal_jax.workdir import Workdir
        Workdir({str(tmp_path)!r}).lock("gal-jax run").acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert result.returncode == -9
    with Workdir(tmp_path).lock("gal-jax run"):
        pass


def test_a_killed_runs_temporaries_are_removed_and_nothing_else(tmp_path):
    workdir = Workdir(tmp_path)
    keep = [tmp_path / "rounds/1/record.json", tmp_path / "rounds/1/unet/config.json",
            tmp_path / "rounds/1/checkpoints/10/state/x"]
    stale = [tmp_path / "rounds/1/.tmp-record.json.abc123", tmp_path / ".tmp-report.html.x1"]
    stale_dirs = [tmp_path / "rounds/1/checkpoints/20.orbax-checkpoint-tmp-1700000000",
                  tmp_path / "rounds/1/.tmp-unet.q9", tmp_path / ".tmp-model.zz"]
    for path in keep + stale + [d / "inner" for d in stale_dirs]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    removed = workdir.remove_stale_temporaries()
    assert sorted(map(str, removed)) == sorted(map(str, stale + stale_dirs))
    assert all(p.exists() for p in keep)
    assert not any(p.exists() for p in stale + stale_dirs)


def test_atomic_writes_leave_no_temporary_and_replace_whole_files(tmp_path):
    target = tmp_path / "a" / "file.json"
    io_utils.write_json(target, {"x": 1})
    io_utils.write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_a_kill_point_kills_before_the_rename(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    script = f"from gal_jax import io_utils; io_utils.write_json({str(target)!r}, {{'new': 1}})"
    env = dict(os.environ, GAL_JAX_KILL_AT="write:record.json")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == -9
    assert target.read_text() == "old"  # the target is untouched; a full temp file lies beside it
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "record.json"]
    assert io_utils.is_temporary_name(leftover.name) and json.loads(leftover.read_text()) == {"new": 1}


def test_run_status_round_trips_and_a_damaged_one_is_named(tmp_path):
    workdir = Workdir(tmp_path)
    assert workdir.read_status() == {}
    workdir.write_status({"status": "complete", "final_round": 3})
    assert workdir.read_status()["final_round"] == 3
    workdir.status.write_text("{")
    with pytest.raises(WorkdirError, match="run.json: not valid JSON"):
        workdir.read_status()


def test_temporaries_of_killed_processes_are_removed_and_live_ones_kept(tmp_path):
    """Outside a locked workdir (the tiny caches, make-tiny --train) a leftover is removed only
    when the process that made it is gone: here a real child made one and was killed with -9."""
    target = tmp_path / "sd"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from gal_jax import io_utils
        folder = io_utils.temporary_dir_beside(Path({str(target)!r}))
        (folder / "half.safetensors").write_text("x")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    live = io_utils.temporary_dir_beside(target)  # this process: running
    other_target = io_utils.temporary_dir_beside(tmp_path / "clip")
    foreign = tmp_path / ".tmp-sd.some-other-host-1.abc"  # another host's: cannot tell, kept
    foreign.mkdir()
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert result.returncode == -9
    [dead] = set(tmp_path.iterdir()) - {live, other_target, foreign}
    assert io_utils.remove_dead_temporaries(tmp_path, "sd") == [dead]
    assert not dead.exists() and live.is_dir() and other_target.is_dir() and foreign.is_dir()
    assert io_utils.remove_dead_temporaries(tmp_path / "missing") == []
    # The next folder made for the same target sweeps what a killed maker left, and only that.
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert result.returncode == -9
    [dead] = set(tmp_path.iterdir()) - {live, other_target, foreign}
    again = io_utils.temporary_dir_beside(target)
    assert not dead.exists() and {live, other_target, foreign, again} == set(tmp_path.iterdir())


def test_the_persistent_compilation_cache_has_a_size_limit():
    """Past the limit jax deletes the least recently used executables; without one, a machine that
    benchmarks many shapes fills its disk."""
    saved = {name: jax.config.values[name] for name in ("jax_compilation_cache_max_size",)}
    try:
        io_utils.enable_compilation_cache(max_bytes=3 * 2**30)
        assert jax.config.values["jax_compilation_cache_max_size"] == 3 * 2**30
        assert io_utils.COMPILATION_CACHE_MAX_BYTES > 0  # the default: GAL_JAX_CACHE_MAX_GB, 8 GB
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_pngs_written_on_threads_are_whole_and_a_failure_is_raised(tmp_path):
    from gal_jax.images import read_rgb_array

    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    paths = [tmp_path / "grid" / f"{i}.png" for i in range(12)]
    io_utils.write_pngs(paths, images, workers=4)
    for path, image in zip(paths, images):
        np.testing.assert_array_equal(read_rgb_array(path), image)
    (tmp_path / "blocked").write_text("a file where a folder should be")
    bad = paths[:5] + [tmp_path / "blocked" / "5.png"] + paths[6:]
    with pytest.raises(OSError):
        io_utils.write_pngs(bad, images[::-1], workers=4)
    np.testing.assert_array_equal(read_rgb_array(paths[11]), images[0])  # the others were written
    assert not list((tmp_path / "grid").glob(".*")), "a temporary file was left"
    with pytest.raises(ValueError, match="12 paths for 3 images"):
        io_utils.write_pngs(paths, images[:3])


def _compile_with_the_cache_in_a_fresh_process(cache_root: Path) -> subprocess.CompletedProcess:
    """Compiles one function in a new process whose persistent cache lives under `cache_root`
    (GAL_JAX_CACHE), warnings raised as errors; returns the finished process."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import jax, jax.numpy as jnp
        from gal_jax import io_utils
        io_utils.enable_compilation_cache()
        jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()
    """)
    env = {**os.environ, "GAL_JAX_CACHE": str(cache_root), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=Path(__file__).parents[1])


def test_a_fresh_process_caches_executables_beside_an_earlier_versions_cache(tmp_path):
    """Earlier versions kept an unlimited cache in GAL_JAX_CACHE/xla, whose entries have no
    access-time files: a size-limited cache in that folder fails every write."""
    old = tmp_path / "xla"
    old.mkdir()
    (old / "jit_f-0123-cache").write_bytes(b"an entry of an earlier version")
    result = _compile_with_the_cache_in_a_fresh_process(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = sorted(p.name for p in (tmp_path / "xla-lru").iterdir())
    assert any(name.endswith("-cache") for name in entries) and any(name.endswith("-atime") for name in entries)


def test_a_kill_while_jax_writes_a_cache_entry_does_not_stop_later_processes_caching(tmp_path):
    """jax writes an entry, then its access-time file: a process killed between the two left an
    entry without one, and every later write to the folder failed (no process cached anything new)."""
    cache = tmp_path / "xla-lru"
    cache.mkdir()
    (cache / "jit_f-0123-cache").write_bytes(b"a whole entry whose access time was never written")
    (cache / "jit_g-4567-cache").write_bytes(b"a kept entry")
    (cache / "jit_g-4567-atime").write_bytes((1).to_bytes(8, "little"))
    (cache / "jit_h-89ab-atime").write_bytes((2).to_bytes(8, "little"))  # its entry already evicted
    result = _compile_with_the_cache_in_a_fresh_process(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Error writing persistent compilation cache" not in result.stderr, result.stderr[-2000:]
    assert "Removed 2 half-written compilation cache entries" in result.stderr
    names = {p.name for p in cache.iterdir()}
    assert "jit_f-0123-cache" not in names and "jit_h-89ab-atime" not in names
    assert {"jit_g-4567-cache", "jit_g-4567-atime"} <= names
    new = {name[:-len("-cache")] for name in names if name.endswith("-cache")} - {"jit_g-4567"}
    assert new and all(f"{key}-atime" in names for key in new), names


def test_the_cache_repair_waits_for_jaxs_lock_and_leaves_a_locked_cache_alone(tmp_path):
    import filelock

    (tmp_path / "jit_f-0-cache").write_bytes(b"x")
    with filelock.FileLock(tmp_path / ".lockfile"):
        script = f"from pathlib import Path; from gal_jax import io_utils; " \
                 f"print(io_utils.repair_compilation_cache(Path({str(tmp_path)!r}), lock_timeout_s=0.2))"
        held = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parents[1])
    assert held.returncode == 0 and held.stdout.strip() == "[]", held.stderr[-2000:]
    assert "locked by another process" in held.stderr
    assert (tmp_path / "jit_f-0-cache").exists()
    assert io_utils.repair_compilation_cache(tmp_path) == ["jit_f-0-cache"]
    assert not (tmp_path / "jit_f-0-cache").exists()


def test_a_workdir_saved_with_renamed_config_fields_resumes_and_real_changes_are_named():
    from configs import common, tiny_cpu

    current = json.loads(tiny_cpu.get_config("attndreambooth").to_json_best_effort(sort_keys=True))
    saved = json.loads(json.dumps(current))
    # As the version before the loss-term registry wrote it.
    saved["train"].pop("loss_terms")
    saved["train"].update(attention_loss_mean=0.0, attention_loss_var=0.0)
    for entry in saved["train"]["stages"].values():
        terms = entry.pop("loss_terms")["attention_map"]
        entry.update(attention_loss_mean=terms["mean"], attention_loss_var=terms["var"])
    assert workdir_lib.config_changes(saved, current) == []
    saved["train"]["stages"]["s2_attention"]["attention_loss_var"] = 4.0
    assert workdir_lib.config_changes(saved, current) == [
        "train.stages.s2_attention.loss_terms.attention_map.var (4.0 -> 5.0)"]
    assert common.get_config().train.loss_terms.attention_map.mean == 0.0


def test_where_the_work_runs_is_no_config_change_but_what_it_computes_is():
    from configs import tiny_world

    current = json.loads(tiny_world.get_config().to_json_best_effort(sort_keys=True))
    saved = json.loads(json.dumps(current))
    # As a tiny-world workdir started before the CPU split: one device, the old chunk bound.
    del saved["mesh"]["cpu_devices"], saved["mesh"]["train_devices"]
    saved["sample"]["max_images_per_device"] = 48
    saved["train"]["checkpoint_every"] = 100
    del saved["train"]["grad_all_reduce"]  # and before train.grad_all_reduce
    del saved["gal"]["oracle"]  # and before gal.oracle (its default: CLIP, as it was)
    assert workdir_lib.config_changes(saved, current) == []
    saved["train"]["grad_all_reduce"] = "xla"
    saved["mesh"].update(cpu_devices=4, train_devices=2)
    assert workdir_lib.config_changes(saved, current) == []
    saved["mesh"]["fsdp"] = 2
    assert workdir_lib.config_changes(saved, current) == ["mesh.fsdp (2 -> 1)"]
    saved["gal"]["oracle"] = "tiny_world_judge"  # what decides the queries
    assert workdir_lib.config_changes(saved, current) == ["gal.oracle ('tiny_world_judge' -> 'clip')", "mesh.fsdp (2 -> 1)"]
