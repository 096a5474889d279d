"""Where a run's inputs come from (real paths or the tiny default, no silent fallback) and their fingerprints."""

from __future__ import annotations

import pytest

from configs import tiny_cpu
from gal_jax import inputs


def config_with(tiny_assets, **paths):
    config = tiny_cpu.get_config()
    config.model.tiny_dir = str(tiny_assets["root"])
    for name, value in paths.items():
        section, field = inputs.REAL_PATH_FIELDS[name]
        config[section][field] = str(value)
    return config


def test_no_real_path_means_the_tiny_default(tiny_assets):
    paths = inputs.resolve(config_with(tiny_assets))
    assert paths.tiny and paths.sd == tiny_assets["sd"] and paths.clip == tiny_assets["clip"]
    assert paths.concept == tiny_assets["object_concept"] and paths.class_dir == tiny_assets["reg_dir"]


def test_the_tiny_style_concept_has_no_class_images(tiny_assets):
    config = config_with(tiny_assets)
    config.data.kind = "style"
    paths = inputs.resolve(config)
    assert paths.concept == tiny_assets["style_concept"] and paths.class_dir is None


def test_every_real_path_given_is_used_as_it_is(tiny_assets):
    config = config_with(tiny_assets, sd=tiny_assets["sd"], clip=tiny_assets["clip"],
                         concept=tiny_assets["object_concept"])
    paths = inputs.resolve(config)
    assert not paths.tiny and paths.class_dir is None and paths.concepts_json is None


@pytest.mark.parametrize("given, missing", [
    ({"sd"}, "config.model.clip_path, config.data.concept_dir is empty"),
    ({"sd", "concept"}, "config.model.clip_path is empty"),
    ({"class"}, "config.model.sd_path, config.model.clip_path, config.data.concept_dir is empty"),
])
def test_a_partial_set_of_real_paths_names_the_missing_fields(tiny_assets, given, missing):
    values = {"sd": tiny_assets["sd"], "clip": tiny_assets["clip"], "concept": tiny_assets["object_concept"],
              "class": tiny_assets["reg_dir"]}
    config = config_with(tiny_assets, **{name: values[name] for name in given})
    with pytest.raises(inputs.InputsError, match=missing):
        inputs.resolve(config)


def test_a_command_needing_only_the_sd_model_accepts_just_its_path(tiny_assets):
    config = config_with(tiny_assets, sd=tiny_assets["sd"])
    assert inputs.resolve(config, need=("sd",)).sd == tiny_assets["sd"]


def test_a_real_path_that_does_not_exist_is_named(tiny_assets, tmp_path):
    config = config_with(tiny_assets, sd=tmp_path / "nope", clip=tiny_assets["clip"],
                         concept=tiny_assets["object_concept"])
    with pytest.raises(inputs.InputsError, match=r"config.model.sd_path=.*nope.*: no such folder"):
        inputs.resolve(config)


def test_fingerprints_name_every_changed_new_and_missing_file(tmp_path):
    files = [tmp_path / f"{name}.txt" for name in "abc"]
    for file in files:
        file.write_text(file.name)
    saved = inputs.fingerprints(files)
    inputs.check_fingerprints(saved, inputs.fingerprints(files), tmp_path / "inputs.json")
    files[0].write_text("changed")
    (tmp_path / "d.txt").write_text("new")
    with pytest.raises(inputs.InputsChangedError) as error:
        inputs.check_fingerprints(saved, inputs.fingerprints([*files[:2], tmp_path / "d.txt"]),
                                  tmp_path / "inputs.json")
    message = str(error.value)
    assert "inputs.json: the inputs changed" in message
    assert f"{files[0]} (changed)" in message and f"{files[2]} (missing or no longer used)" in message
    assert f"{tmp_path / 'd.txt'} (new)" in message and str(files[1]) + " (" not in message


def test_input_files_cover_references_classes_anchor_file_and_model_configs(tiny_assets, tmp_path):
    paths = inputs.resolve(config_with(tiny_assets))
    anchor_file = tmp_path / "anchors.txt"
    anchor_file.write_text("{} in park\n")
    references = sorted(tiny_assets["object_concept"].glob("*.jpg"))
    files = inputs.input_files(paths, references, [tiny_assets["reg_dir"] / "0.jpg"], anchor_file)
    names = {str(f.relative_to(tiny_assets["root"])) if f.is_relative_to(tiny_assets["root"]) else f.name
             for f in files}
    assert {"anchors.txt", "sd/unet/config.json", "sd/tokenizer/vocab.json", "clip/config.json",
            "data/reference_images/object/teapot/init.json"} <= names
    assert all(f.is_file() for f in files)
    assert not any(f.suffix == ".safetensors" for f in files), "weights are not hashed at each start"
