"""The concept of an experiment on the GAL authors' ten object concepts: class phrase, concept phrase,
class prompt, and the placeholder inserted into their test prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from configs import tiny_cpu
from gal_jax import concept, evaluate

# (class_prompt, placeholder) as the authors' data/concepts_list_object.json lists them, the class as
# it reads in a prompt, and lines of the concept's test prompt file (data/test_prompts/<concept>.txt).
AUTHORS_CONCEPTS = {
    "cat": ("<cute-cat>", "cat", ["Photo of cat", "a sleeping cat", "a sculpture of cat"]),
    "dog": ("<black-dog>", "dog", ["Photo of dog", "a joyous dog"]),
    "table": ("<brown-table>", "table", ["Photo of table", "table and an orange sofa",
                                         "a study table in the style of table"]),
    "flower": ("<white-flower>", "flower", ["Photo of flower", "a dahlia flower in the style of flower"]),
    "barn": ("<brown-barn>", "barn", ["photo of a barn", "painting of barn in the style of van gogh"]),
    "wooden_pot": ("<wooden-pot>", "wooden pot", ["Photo of wooden pot", "Rose flowers in wooden pot on a table",
                                                  "a teapot in the style of wooden pot"]),
    "cat_statue": ("<cat-statue>", "cat statue", ["Photo of cat statue", "cat statue under a tree"]),
    "teapot": ("<red-teapot>", "teapot", ["Photo of teapot", "teapot pouring water"]),
    "teddybear": ("<teddy-bear>", "teddybear", ["Photo of teddybear", "A koala in the style of teddybear"]),
    "chair": ("<blue-chair>", "chair", ["Photo of chair", "An egg chair in the style of chair"]),
}
CONTEXTS = ("on the table", "next to the window")


def write_concept(root: Path, name: str, contexts=CONTEXTS) -> Path:
    """Writes a concept folder in the authors' layout: images and init.json, their caption style."""
    placeholder, noun, _ = AUTHORS_CONCEPTS[name]
    folder = root / "reference_images" / "object" / name
    (folder / "imgs").mkdir(parents=True)
    entries = []
    for i, context in enumerate(contexts):
        Image.new("RGB", (8, 8), (30 * i, 90, 120)).save(folder / "imgs" / f"{i}.jpg")
        entries.append({"instance_prompt": f"A {placeholder} {noun} {context}", "plain_prompt": f"A {noun} {context}",
                        "instance_data_path": f"./data/object/{name}/imgs/{i}.jpg", "weight": 1.0})
    (folder / "init.json").write_text(json.dumps(entries, indent=4))
    return folder


def write_concepts_list(root: Path) -> Path:
    """Writes the authors' concepts list layout, with each concept's test prompts."""
    entries = []
    for name, (placeholder, noun, prompts) in AUTHORS_CONCEPTS.items():
        prompt_file = root / "data" / "test_prompts" / f"{name}.txt"
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        prompt_file.write_text("\n".join(prompts))
        entries.append({"class_prompt": name, "placeholder": placeholder,
                        "test_prompts": f"./data/test_prompts/{name}.txt", "caption": [f"a {noun} on the table"]})
    path = root / "data" / "concepts_list_object.json"
    path.write_text(json.dumps(entries, indent=4))
    return path


def object_config():
    config = tiny_cpu.get_config()
    config.data.placeholder = config.data.class_word = config.data.class_prompt = ""
    return config


@pytest.mark.parametrize("name", list(AUTHORS_CONCEPTS))
def test_each_authors_concept_gets_its_class_phrase_from_the_concepts_list(tmp_path, name):
    placeholder, noun, _ = AUTHORS_CONCEPTS[name]
    folder = write_concept(tmp_path, name, contexts=("on the table",) * 3)  # one caption: no inference
    loaded = concept.load_concept(object_config(), folder, None, write_concepts_list(tmp_path))
    assert loaded.phrase == f"a {placeholder} {noun}"
    assert loaded.class_prompt == f"a photo of a {noun}"
    assert loaded.anchor_prompts[0] == f"a {placeholder} {noun} in park"
    assert loaded.plain_prompts == (f"A {noun} on the table",)


@pytest.mark.parametrize("name", list(AUTHORS_CONCEPTS))
def test_each_authors_concept_gets_its_class_phrase_from_its_captions_alone(tmp_path, name):
    placeholder, noun, _ = AUTHORS_CONCEPTS[name]
    loaded = concept.load_concept(object_config(), write_concept(tmp_path, name), None, None)
    assert loaded.phrase == f"a {placeholder} {noun}" and loaded.class_prompt == f"a photo of a {noun}"


@pytest.mark.parametrize("name", list(AUTHORS_CONCEPTS))
def test_the_placeholder_goes_before_every_class_word_of_the_authors_test_prompts(tmp_path, name):
    placeholder, noun, prompts = AUTHORS_CONCEPTS[name]
    (listed,) = [c for c in evaluate.read_concepts_list(write_concepts_list(tmp_path)) if c.name == name]
    generation = listed.generation_prompts()
    for prompt, inserted in zip(prompts, generation):
        count = prompt.lower().count(noun)
        assert inserted.count(f"{placeholder} {noun}") + inserted.count(f"{placeholder} {noun.capitalize()}") == count
        assert inserted.replace(f"{placeholder} ", "") == prompt
    assert listed.scoring_prompts() == prompts


def test_a_single_caption_concept_cuts_the_class_before_its_context(tmp_path):
    loaded = concept.load_concept(object_config(), write_concept(tmp_path, "cat_statue", ("on the table",) * 2),
                                  None, None)
    assert loaded.phrase == "a <cat-statue> cat statue"


def test_a_class_word_in_the_config_wins_and_reads_underscores_as_spaces(tmp_path):
    config = object_config()
    config.data.class_word = "wooden_pot"
    loaded = concept.load_concept(config, write_concept(tmp_path, "wooden_pot", ("on the table",)), None, None)
    assert loaded.phrase == "a <wooden-pot> wooden pot" and loaded.class_prompt == "a photo of a wooden pot"


def test_class_images_are_capped_at_num_class_images(tiny_assets):
    config = tiny_cpu.get_config()
    config.data.num_class_images = 7
    loaded = concept.load_concept(config, tiny_assets["object_concept"], tiny_assets["reg_dir"], None)
    assert len(loaded.class_images) == 7
    assert loaded.class_images == tuple(sorted(tiny_assets["reg_dir"].glob("*.jpg")))[:7]


def test_a_caption_without_a_class_after_the_placeholder_is_named(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0.jpg")
    (folder / "init.json").write_text(json.dumps([{"instance_prompt": "A photo of <sks>", "plain_prompt": "A photo of",
                                                   "instance_data_path": "0.jpg", "weight": 1.0}]))
    with pytest.raises(ValueError, match=r"init.json: cannot tell the class after '<sks>'.*class_word"):
        concept.load_concept(object_config(), folder, None, None)
