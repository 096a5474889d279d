"""Tests of gal_jax.tiny_data: the tiny synthetic concepts in the authors' layout."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gal_jax import data, tiny_data

RESOLUTION = 32


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Returns every file under `root` by relative path, with its bytes."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("a") / "data"
    return tiny_data.make_tiny_concepts(root, resolution=RESOLUTION)


def test_same_seed_writes_the_same_bytes_anywhere(tiny, tmp_path):
    again = tiny_data.make_tiny_concepts(tmp_path / "elsewhere", resolution=RESOLUTION)
    first, second = tree_bytes(tiny["data_root"]), tree_bytes(again["data_root"])
    multi = 6 + 6 + 1  # two subjects x 3 images, their masks, metadata.jsonl
    prior = 4 + 4 + 1  # two classes x 2 images, their masks, class_metadata.jsonl
    assert len(first) == 4 + 1 + 4 + 1 + tiny_data.NUM_CLASS_IMAGES + 1 + 1 + 1 + multi + prior  # + marker
    assert first == second


def test_another_seed_draws_other_images(tiny, tmp_path):
    other = tiny_data.make_tiny_concepts(tmp_path / "other", resolution=RESOLUTION, seed=1)
    image = "reference_images/object/teapot/0.jpg"
    assert tree_bytes(tiny["data_root"])[image] != tree_bytes(other["data_root"])[image]


def test_second_call_on_a_complete_set_writes_nothing(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny["data_root"].rglob("*")}
    assert tiny_data.make_tiny_concepts(tiny["data_root"], resolution=RESOLUTION) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny["data_root"].rglob("*")} == before


def test_existing_set_made_with_other_arguments_is_reported(tiny):
    with pytest.raises(ValueError, match="made with"):
        tiny_data.make_tiny_concepts(tiny["data_root"], resolution=RESOLUTION, seed=5)


def test_a_foreign_non_empty_folder_is_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny concept set"):
        tiny_data.make_tiny_concepts(tmp_path, resolution=RESOLUTION)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_an_existing_empty_folder_is_filled(tmp_path):
    paths = tiny_data.make_tiny_concepts(tmp_path, resolution=RESOLUTION)
    assert (paths["object_concept"] / "init.json").is_file()


def test_killed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_data, "_write_style_concept", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_data.make_tiny_concepts(tmp_path / "data", resolution=RESOLUTION)
    assert list(tmp_path.iterdir()) == []


def test_object_concept_follows_the_authors_layout(tiny):
    init = json.loads((tiny["object_concept"] / "init.json").read_text())
    assert [e["instance_data_path"] for e in init] == [
        f"./reference_images/object/teapot/{i}.jpg" for i in range(4)
    ]
    refs = data.load_concept(tiny["object_concept"])
    assert all(r.prompt.startswith("a <tiny-teapot> teapot ") for r in refs)
    assert all(r.plain_prompt == r.prompt.replace("<tiny-teapot> ", "") for r in refs)
    assert [r.image for r in refs] == [tiny["object_concept"] / f"{i}.jpg" for i in range(4)]


def test_style_concept_has_captions_and_no_plain_prompt(tiny):
    init = json.loads((tiny["style_concept"] / "init.json").read_text())
    assert all("plain_prompt" not in e for e in init)
    refs = data.load_concept(tiny["style_concept"])
    assert [r.prompt for r in refs] == [
        f"A {s} in watercolor painting style" for s in ("cat", "house", "tree", "boat")
    ]


def test_every_image_is_a_square_rgb_jpeg_at_the_resolution(tiny):
    images = sorted(tiny["data_root"].rglob("*.jpg"))
    assert len(images) == 8 + tiny_data.NUM_CLASS_IMAGES + 6 + 4  # + the two subjects and their prior set
    for path in images:
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
            assert image.size == (RESOLUTION, RESOLUTION)


def load_all(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), np.float32) for p in data.list_images(folder)])


def test_references_show_one_teapot_in_different_scenes_and_class_teapots_vary(tiny):
    references = load_all(tiny["object_concept"])
    concept_red = np.all(np.abs(references - np.array(tiny_data._CONCEPT_RED)) < 40, axis=-1)
    assert concept_red.mean(axis=(1, 2)).min() > 0.02  # the red teapot is in every reference
    assert np.abs(references[0] - references[2]).mean() > 20  # table vs grass
    classes = load_all(tiny["reg_dir"])
    assert np.abs(classes[1:] - classes[:-1]).mean(axis=(1, 2, 3)).min() > 10


def test_concepts_json_names_a_test_prompt_file_and_the_plain_captions(tiny):
    concepts = json.loads(tiny["concepts_json"].read_text())
    assert len(concepts) == 1
    concept = concepts[0]
    assert set(concept) == {
        "class_prompt", "placeholder", "test_prompts", "caption", "concept", "kind"
    }
    assert concept["class_prompt"] == concept["concept"] == "teapot"
    assert (concept["placeholder"], concept["kind"]) == ("<tiny-teapot>", "object")
    prompts_file = tiny["concepts_json"].parent / concept["test_prompts"]
    assert prompts_file.resolve() == tiny["test_prompts"].resolve()
    prompts = prompts_file.read_text().splitlines()
    assert len(prompts) == 5 and all("teapot" in p for p in prompts)
    plain = {r.plain_prompt for r in data.load_concept(tiny["object_concept"])}
    assert set(concept["caption"]) == plain and len(concept["caption"]) == len(plain)


def test_a_set_of_an_earlier_format_is_rebuilt_in_place(tmp_path):
    paths = tiny_data.make_tiny_concepts(tmp_path / "set", resolution=RESOLUTION)
    marker = paths["data_root"] / ".tiny_concepts.json"
    for version, lacks in ((1, "multi_subject_concept"), (2, "multi_subject_prior")):
        marker.write_text(json.dumps({"version": version, "resolution": RESOLUTION, "seed": 0}))
        shutil.rmtree(paths[lacks])  # what a set of that version lacks
        assert tiny_data.make_tiny_concepts(tmp_path / "set", resolution=RESOLUTION) == paths
        assert (paths["multi_subject_concept"] / "metadata.jsonl").is_file()
        assert (paths["multi_subject_prior"] / "class_metadata.jsonl").is_file()
