"""Tests of gal_jax.tiny_world: the tiny trained world's scenes, data sets, files and judge."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from gal_jax import anchors, data, evaluate, metrics, tiny_world
from gal_jax import tiny_world_contexts as contexts
from gal_jax import tiny_world_draw as draw

RES = tiny_world.RESOLUTION
SAMPLES_PER_CONTEXT = 100  # the judge's tests: 23 contexts x 100 pictures (2,300 in all)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Returns every file under `root` by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def blurred(image: np.ndarray, radius: float = 1.0) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def noisy(image: np.ndarray, rng: np.random.Generator, sigma: float = 12.0) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)


def concept_tone_rows(image: np.ndarray, tolerance: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Returns the row indices of the pixels near the concept's upper colour and its lower one."""
    def rows_near(colour):
        return np.nonzero(np.linalg.norm(image.astype(np.float32) - np.asarray(colour), axis=-1) < tolerance)[0]

    return rows_near(tiny_world.CONCEPT_BODY), rows_near(tiny_world.CONCEPT_LOWER)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return tiny_world.write_world(tmp_path_factory.mktemp("w") / "world", num_train=40, num_class_images=6)


@pytest.fixture(scope="module")
def per_context() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(123)
    return {c: [tiny_world.sample_scene(rng, context=c).image for _ in range(SAMPLES_PER_CONTEXT)]
            for c in tiny_world.CONTEXTS}


# ---------------------------------------------------------------------------------------------
# Scenes and captions.


def test_same_seed_gives_identical_scenes_and_another_seed_other_ones():
    first, second = tiny_world.training_set(12, seed=3), tiny_world.training_set(12, seed=3)
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in second]
    assert [s.caption for s in first] == [s.caption for s in second]
    other = tiny_world.training_set(12, seed=4)
    assert all(a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other))


def test_every_attribute_is_drawable_and_captioned_as_specified():
    rng = np.random.default_rng(0)
    cases = ([{"context": c} for c in tiny_world.CONTEXTS] + [{"obj": o} for o in tiny_world.OBJECTS]
             + [{"colour": c} for c in tiny_world.COLOURS] + [{"pattern": p} for p in tiny_world.PATTERNS]
             + [{"style": s} for s in tiny_world.STYLES])
    for given in cases:
        scene = tiny_world.sample_scene(rng, **given)
        assert scene.image.shape == (RES, RES, 3) and scene.image.dtype == np.uint8
        attributes = {"context": scene.context, "obj": scene.object, "colour": scene.colour,
                      "pattern": scene.pattern, "style": scene.style}
        assert {k: attributes[k] for k in given} == given
        look = scene.colour if scene.pattern == "plain" else f"{scene.pattern} {scene.colour}"
        expected = f"a {look} {scene.object} {scene.context}"
        if scene.style:
            expected += f" {tiny_world.STYLES[scene.style]}"
        assert scene.caption == expected
    assert tiny_world.caption("cup", "blue", "striped", "in a kitchen") == "a striped blue cup in a kitchen"
    assert tiny_world.caption("teapot", "red", "plain", "on the beach") == "a red teapot on the beach"


def test_world_has_at_least_what_the_spec_asks():
    assert set(tiny_world.ANCHOR_CONTEXTS) | {"on a table"} <= set(tiny_world.CONTEXTS)
    assert {"teapot", "chair", "cat", "flower", "cup"} <= set(tiny_world.OBJECTS)
    assert len(tiny_world.COLOURS) >= 8 and {"plain", "striped", "dotted"} <= set(tiny_world.PATTERNS)
    assert len(tiny_world.STYLES) >= 3
    assert tiny_world.STYLES["watercolor"] == "in watercolor painting style"


def test_unknown_attributes_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown context"):
        tiny_world.sample_scene(rng, context="in space")
    with pytest.raises(ValueError, match="unknown style"):
        tiny_world.sample_scene(rng, style="stained glass")  # the style concept's own style


def test_context_phrases_are_the_paper_anchor_templates_so_captions_line_up_with_anchor_prompts():
    templates = anchors.PAPER_OBJECT_TEMPLATES
    assert tiny_world.ANCHOR_CONTEXTS == tuple(t.replace("{} ", "") for t in templates)
    phrase = anchors.concept_phrase_object(tiny_world.PLACEHOLDER, "teapot")
    for template, context in zip(templates, tiny_world.ANCHOR_CONTEXTS):
        plain = tiny_world.caption("teapot", "red", "plain", context)
        assert anchors.fill_anchor(template, phrase) == plain.replace("red", tiny_world.PLACEHOLDER)
        assert tiny_world.prompt_context(anchors.fill_anchor(template, phrase)) == context


def test_object_swaps_change_the_object_word_only():
    swaps = tiny_world.object_swaps("a striped blue sks cup in a kitchen in pixel art style")
    assert len(swaps) == len(tiny_world.OBJECTS) - 1
    assert "a striped blue sks teapot in a kitchen in pixel art style" in swaps
    assert all(s.replace(o, "cup") == "a striped blue sks cup in a kitchen in pixel art style"
               for s, o in zip(swaps, [o for o in tiny_world.OBJECTS if o != "cup"]))
    with pytest.raises(ValueError, match="names 0 object kinds"):
        tiny_world.object_swaps("a blue thing on the beach")
    with pytest.raises(ValueError, match="names 2 object kinds"):
        tiny_world.object_swaps("a blue cat and a cup on the beach")


def test_colour_swaps_change_the_colour_word_only():
    swaps = tiny_world.colour_swaps("a striped blue sks cup in a kitchen")
    assert swaps == tuple(f"a striped {c} sks cup in a kitchen" for c in tiny_world.COLOURS if c != "blue")
    with pytest.raises(ValueError, match="names 0 colours"):
        tiny_world.colour_swaps("a cup on the beach")
    with pytest.raises(ValueError, match="names 2 colours"):
        tiny_world.colour_swaps("a red cup and a blue cat on the beach")


def test_prompt_context_reads_test_prompts_and_styled_captions():
    assert tiny_world.prompt_context("<tiny-teapot> teapot in an autumn forest") == "in an autumn forest"
    assert tiny_world.prompt_context("a red cat in a forest in pixel art style") == "in a forest"
    assert tiny_world.prompt_context("a teapot on the stairs") is None


def test_no_two_pictures_of_a_context_are_alike(per_context):
    for context, images in per_context.items():
        stack = np.stack(images[:20]).astype(np.float32)
        differences = np.abs(stack[:, None] - stack[None]).mean(axis=(2, 3, 4))
        assert differences[~np.eye(len(stack), dtype=bool)].min() > 2.0, context


def test_object_stands_in_the_middle_at_30_to_50_percent_of_the_height():
    rng = np.random.default_rng(5)
    size = RES * draw.SUPERSAMPLE
    for index in range(100):
        obj, context = tiny_world.OBJECTS[index % 5], tiny_world.CONTEXTS[index % len(tiny_world.CONTEXTS)]
        canvas = Image.new("RGB", (size, size))
        contexts.CONTEXT_PAINTERS[context](draw.Pen(canvas), rng, contexts.CONTEXT_PALETTES[context])
        background = np.asarray(canvas).copy()
        draw.draw_object(canvas, rng, obj, draw.COLOURS["purple"], "plain",
                            pattern_colour=draw.PATTERN_LIGHT)
        changed = np.abs(np.asarray(canvas).astype(int) - background).sum(axis=-1) > 0
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert 0.3 <= (rows[-1] - rows[0] + 1) / size <= 0.5, (obj, context)
        assert abs((cols[0] + cols[-1]) / 2 / size - 0.5) < 0.12, (obj, context)


def test_styles_transform_the_whole_picture():
    rng = np.random.default_rng(9)
    plain = tiny_world.sample_scene(np.random.default_rng(1), context="in park", obj="cat").image
    for style, transform in draw.STYLE_TRANSFORMS.items():
        styled = transform(plain, rng)
        assert styled.shape == plain.shape and styled.dtype == np.uint8, style
        assert np.abs(styled.astype(int) - plain).mean() > 10, style
    pixel = draw.pixel_art(plain, rng)
    assert (pixel.reshape(16, 4, 16, 4, 3) == pixel[::4, ::4][:, None, :, None]).all()  # 16 px blocks
    sketch = draw.pencil_sketch(plain, rng)
    assert (sketch[..., 0] == sketch[..., 1]).all() and sketch.mean() > 180  # grey strokes on white


def test_training_set_is_balanced_and_one_in_ten_is_styled():
    scenes = tiny_world.training_set(230, seed=1)
    for attribute, values in (("context", tiny_world.CONTEXTS), ("object", tiny_world.OBJECTS),
                              ("colour", tiny_world.COLOURS), ("pattern", tiny_world.PATTERNS)):
        counts = [sum(getattr(s, attribute) == v for s in scenes) for v in values]
        assert max(counts) - min(counts) <= 1, attribute
    styled = [s.style for s in scenes if s.style]
    assert len(styled) == 23 and set(styled) == set(tiny_world.STYLES)


def test_one_in_ten_training_captions_carries_an_identifier_and_the_picture_ignores_it():
    scenes = tiny_world.training_set(230, seed=1)
    identified = [s for s in scenes if any(f" {w} " in s.caption for w in tiny_world.IDENTIFIERS)]
    assert len(identified) == 23
    assert {w for s in identified for w in tiny_world.IDENTIFIERS if f" {w} {s.object} " in s.caption} == set(tiny_world.IDENTIFIERS)
    assert tiny_world.PLACEHOLDER in tiny_world.IDENTIFIERS  # the towers know the concept's placeholder
    for scene in identified[:3]:
        plain = tiny_world.caption(scene.object, scene.colour, scene.pattern, scene.context, scene.style)
        assert tiny_world.without_identifiers(scene.caption) == plain
        assert tiny_world.prompt_context(scene.caption) == scene.context
    assert tiny_world.caption("cup", "blue", "plain", "in a kitchen", identifier="sks") == "a blue sks cup in a kitchen"


def test_each_training_scene_has_a_twin_that_differs_in_one_attribute_only():
    scenes = tiny_world.training_set(60, seed=5)
    twins = list(tiny_world.training_twins(60, seed=5))
    changed = []
    for scene, twin in zip(scenes, twins):
        differ = [a for a in ("object", "colour", "pattern", "context", "style") if getattr(scene, a) != getattr(twin, a)]
        assert len(differ) == 1 and differ[0] in tiny_world.TWIN_ATTRIBUTES, (scene.caption, twin.caption)
        changed.append(differ[0])
        # The caption changes in that one word (an identifier stays); the picture in the object only.
        words = list(zip(scene.caption.split(), twin.caption.split()))
        assert [pair for pair in words if pair[0] != pair[1]] == [(getattr(scene, differ[0]), getattr(twin, differ[0]))]
        if scene.style is None:
            assert (scene.image == twin.image).all(axis=-1).mean() > 0.6
    assert changed.count("object") >= 15 and changed.count("colour") >= 15
    # Scene i's twin depends on (seed, i, n) only, and the attributes can be narrowed.
    again = list(tiny_world.training_twins(60, seed=5))
    assert [t.image.tobytes() for t in again] == [t.image.tobytes() for t in twins]
    objects_only = list(tiny_world.training_twins(20, seed=5, attributes=("object",)))
    assert all(t.object != s.object and t.colour == s.colour
               for s, t in zip(tiny_world.training_set(20, seed=5), objects_only))
    with pytest.raises(ValueError, match="twin attributes must be some of object, colour"):
        next(tiny_world.training_twins(2, attributes=("context",)))


def test_the_concept_look_never_appears_in_the_training_set():
    scenes = tiny_world.training_set(400, seed=2)
    assert tiny_world.CONCEPT_PATTERN not in tiny_world.PATTERNS
    assert not any(s.pattern == tiny_world.CONCEPT_PATTERN for s in scenes)
    reference = tiny_world.concept_scene(np.random.default_rng(0))
    upper, lower = concept_tone_rows(reference.image)
    assert min(len(upper), len(lower)) > 0.02 * 64 * 64  # both tones show, yellow above blue
    assert upper.mean() < lower.mean() - 4, (upper.mean(), lower.mean())


# ---------------------------------------------------------------------------------------------
# The world on disk.


def test_write_world_writes_the_authors_layout(world):
    assert set(world) >= {"object_concept", "style_concept", "reg_dir", "test_prompts", "concepts_json",
                          "data_root"}
    references = data.load_concept(world["object_concept"])
    assert [r.image.name for r in references] == [f"{i}.png" for i in range(tiny_world.NUM_REFERENCES)]
    assert {r.prompt for r in references} == {f"a {tiny_world.PLACEHOLDER} teapot on a table"}
    assert {r.plain_prompt for r in references} == {"a teapot on a table"}
    images = np.stack([np.asarray(Image.open(r.image)) for r in references])
    assert all(tiny_world.judge_context(image) == "on a table" for image in images)
    assert np.abs(images[1:].astype(int) - images[:-1]).mean(axis=(1, 2, 3)).min() > 2  # small variations
    (style,) = data.load_concept(world["style_concept"])
    assert style.prompt == "a cat in stained glass style" and style.plain_prompt is None
    assert len(data.list_images(world["reg_dir"])) == 6


def test_concepts_list_and_test_prompts_take_the_placeholder(world):
    (concept,) = evaluate.read_concepts_list(world["concepts_json"])
    assert (concept.class_prompt, concept.placeholder) == ("teapot", tiny_world.PLACEHOLDER)
    assert concept.captions == ("a teapot on a table",)
    assert [tiny_world.prompt_context(p) for p in concept.test_prompts] == list(tiny_world.TEST_CONTEXTS)
    assert set(tiny_world.HELD_OUT_CONTEXTS) <= set(tiny_world.TEST_CONTEXTS)
    assert not set(tiny_world.HELD_OUT_CONTEXTS) & set(tiny_world.ANCHOR_CONTEXTS)
    for prompt, generation in zip(concept.test_prompts, concept.generation_prompts()):
        assert generation == metrics.insert_placeholder(prompt, "teapot", tiny_world.PLACEHOLDER)
        assert generation.startswith(f"a {tiny_world.PLACEHOLDER} teapot ")
    (style,) = evaluate.read_concepts_list(world["style_concepts_json"])
    assert style.kind == "style" and style.style_descriptor == "in stained glass style"
    assert all(p.endswith(" in stained glass style") for p in style.scoring_prompts())


def test_training_set_on_disk_lists_every_picture_with_its_caption(world):
    lines = [json.loads(line) for line in (world["train_dir"] / "captions.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == [f"{i:06d}.png" for i in range(40)]
    scenes = tiny_world.training_set(40, seed=0)
    assert [line["caption"] for line in lines] == [s.caption for s in scenes]
    assert set(lines[0]) == {"file", "caption", "object", "colour", "pattern", "context", "style"}
    for line, scene in zip(lines[:5], scenes):
        assert (np.asarray(Image.open(world["train_dir"] / line["file"])) == scene.image).all()
    described = json.loads((world["data_root"] / "world" / "world.json").read_text())
    assert described["contexts"] == list(tiny_world.CONTEXTS)


def test_same_seed_writes_the_same_bytes_and_a_second_call_writes_nothing(world, tmp_path):
    again = tiny_world.write_world(tmp_path / "again", num_train=40, num_class_images=6)
    assert tree_bytes(world["data_root"]) == tree_bytes(again["data_root"])
    before = {p: p.stat().st_mtime_ns for p in again["data_root"].rglob("*")}
    assert tiny_world.write_world(tmp_path / "again", num_train=40, num_class_images=6) == again
    assert {p: p.stat().st_mtime_ns for p in again["data_root"].rglob("*")} == before


def test_a_world_made_with_other_arguments_is_replaced(tmp_path):
    first = tiny_world.write_world(tmp_path / "w", num_train=4, num_class_images=2)
    second = tiny_world.write_world(tmp_path / "w", num_train=6, num_class_images=2)
    assert len(list(second["train_dir"].glob("*.png"))) == 6 and first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_foreign_folder_is_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny world"):
        tiny_world.write_world(tmp_path, num_train=4)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_killed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_world, "_write_training_set", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_world.write_world(tmp_path / "w", num_train=4)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The judge.


def context_accuracy(per_context, transform) -> dict[str, float]:
    return {c: float(np.mean([tiny_world.judge_context(transform(i)) == c for i in images]))
            for c, images in per_context.items()}


def test_judge_names_the_context_of_clean_pictures(per_context):
    accuracy = context_accuracy(per_context, lambda image: image)
    assert min(accuracy.values()) >= 0.97, {c: a for c, a in accuracy.items() if a < 0.97}


def test_judge_names_the_context_of_blurred_pictures(per_context):
    accuracy = context_accuracy(per_context, blurred)
    assert min(accuracy.values()) >= 0.9, {c: a for c, a in accuracy.items() if a < 0.9}


def test_judge_names_the_context_of_noisy_pictures(per_context):
    rng = np.random.default_rng(0)
    accuracy = context_accuracy(per_context, lambda image: noisy(image, rng))
    assert min(accuracy.values()) >= 0.9, {c: a for c, a in accuracy.items() if a < 0.9}


def test_judge_names_the_context_of_blurred_and_noisy_pictures(per_context):
    rng = np.random.default_rng(1)
    accuracy = context_accuracy(per_context, lambda image: noisy(blurred(image, 1.5), rng, 15.0))
    assert min(accuracy.values()) >= 0.9, {c: a for c, a in accuracy.items() if a < 0.9}


def test_context_scores_are_a_distribution_whose_argmax_is_the_judgement(per_context):
    for context in ("on the beach", "in the cave"):
        scores = tiny_world.context_scores(per_context[context][0])
        assert set(scores) == set(tiny_world.CONTEXTS) and abs(sum(scores.values()) - 1) < 1e-6
        assert max(scores, key=scores.get) == context == tiny_world.judge_context(per_context[context][0])


def test_judge_reads_pictures_of_other_resolutions():
    rng = np.random.default_rng(3)
    for context in tiny_world.CONTEXTS:
        image = tiny_world.sample_scene(rng, context=context, resolution=128).image
        assert image.shape == (128, 128, 3)
        assert tiny_world.judge_context(image) == context


def test_judge_names_colour_and_object_of_most_pictures():
    rng = np.random.default_rng(4)
    scenes = [tiny_world.sample_scene(rng) for _ in range(400)]
    judged = [tiny_world.judge_scene(s.image) for s in scenes]
    colour = np.mean([j["colour"] == s.colour for j, s in zip(judged, scenes)])
    kind = np.mean([j["object"] == s.object for j, s in zip(judged, scenes)])
    chromatic = [(j, s) for j, s in zip(judged, scenes) if s.colour not in ("white", "black")]
    kind_chromatic = np.mean([j["object"] == s.object for j, s in chromatic])
    assert colour >= 0.93 and kind >= 0.85 and kind_chromatic >= 0.9, (colour, kind, kind_chromatic)


def test_generating_ten_thousand_pictures_takes_well_under_a_minute_of_one_core():
    start = time.process_time()
    tiny_world.training_set(300, seed=5)
    per_picture = (time.process_time() - start) / 300
    assert per_picture * 10_000 < 35.0, f"{per_picture * 1000:.2f} ms a picture"
