"""Multi-subject data (MuDI's layout, read unchanged): the reader and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gal_jax import multi_subject

SUBJECTS = {"a": "olis harry potter toy", "b": "hta corgi"}


COLOURS = {"a": (255, 0, 0), "b": (0, 0, 255)}
# MuDI's prior set of the same two subjects (dataset/reg/<name>/class_metadata.jsonl): ids name classes.
PRIOR_CLASSES = {"a": "harry potter toy", "b": "Corgi"}
PRIOR_COLOURS = {"a": (0, 160, 0), "b": (240, 200, 0)}


def write_dataset(folder, sizes=None, *, lines=None, first=None, solid=False, subjects=SUBJECTS, colours=COLOURS,
                  file=multi_subject.METADATA, caption="A photo of a {} on a desk.", count=2):
    """Writes a MuDI-style dataset: for each subject `count` images with a centred box mask, and
    their `file` (as MuDI ships it: the id mapping first, then one line per image). `solid`: each
    subject's image is one colour (`colours`), PNG so that it stays exact."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for subject, phrase in subjects.items():
        for index in range(count):
            name = f"{subject}{index:02d}.{'png' if solid else 'jpg'}"
            width, height = (sizes or {}).get(name, (40, 32))
            pixels = rng.integers(0, 255, (height, width, 3), np.uint8)
            if solid:
                pixels[:] = colours[subject]
            Image.fromarray(pixels).save(folder / name)
            mask = np.zeros((height, width), np.uint8)
            mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
            Image.fromarray(mask).save(folder / f"mask_{name}")
            rows.append({"id": subject, "file_name": name, "mask_path": f"mask_{name}",
                         "text": caption.format(phrase)})
    text = [json.dumps(first if first is not None else {"id": subjects})]
    text += lines if lines is not None else [json.dumps(row) for row in rows]
    (folder / file).write_text("\n".join(text) + "\n")
    return folder


def write_prior(folder, **kwargs):
    """Writes MuDI's prior set of SUBJECTS as they ship one (class_metadata.jsonl: ids naming the
    class words, captions "A photo of a harry potter toy"), solid colours PRIOR_COLOURS."""
    return write_dataset(folder, subjects=PRIOR_CLASSES, colours=PRIOR_COLOURS, file=multi_subject.CLASS_METADATA,
                         caption="A photo of a {}", solid=True, **kwargs)


def test_a_mudi_dataset_reads_as_it_ships(tmp_path):
    folder = write_dataset(tmp_path / "actionfigure_2_and_dog0")
    data = multi_subject.read_metadata(folder)
    assert data.subjects == SUBJECTS and len(data.images) == 4
    assert [i.image.name for i in data.of("b")] == ["b00.jpg", "b01.jpg"]
    assert data.of("a")[0].text == "A photo of a olis harry potter toy on a desk."
    mask = multi_subject.load_mask(data.images[0].mask)
    assert mask.shape == (32, 40) and mask.dtype == np.float32
    assert mask[16, 20] > 0.9 and mask[0, 0] < 0.1


def _row(**fields):
    row = {"id": "a", "file_name": "a00.jpg", "mask_path": "mask_a00.jpg", "text": "A photo."}
    row.update(fields)
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize("lines, first, message", [
    ([_row(id="c"), _row(id="b", file_name="b00.jpg", mask_path="mask_b00.jpg")], None,
     r"line 2: id 'c' is not a subject of line 1 \('a', 'b'\)"),
    ([_row(mask_path=None)], None, r"line 2: missing 'mask_path'"),
    ([_row(), "{not json"], None, r"line 3: not valid JSON"),
    ([_row(mask_path="mask_zz.jpg"), _row(id="b", file_name="b00.jpg", mask_path="mask_b00.jpg")], None,
     r"line 2: mask_path .*mask_zz.jpg does not exist"),
    ([_row()], None, r"subject 'b' \('hta corgi'\) has no image line"),
    ([_row()], {"a": "x"}, r"line 1: the first line must map subject ids"),
    ([_row()], {"id": {"a": ""}}, r"line 1: subject 'a' needs a non-empty phrase"),
])
def test_bad_metadata_is_named_with_its_line(tmp_path, lines, first, message):
    folder = write_dataset(tmp_path / "set", lines=lines, first=first)
    with pytest.raises(multi_subject.MultiSubjectDataError, match=message):
        multi_subject.read_metadata(folder / multi_subject.METADATA)


def test_a_mask_of_another_size_is_named(tmp_path):
    folder = write_dataset(tmp_path / "set")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "mask_b01.jpg")
    with pytest.raises(multi_subject.MultiSubjectDataError,
                       match=r"metadata.jsonl, line 5: mask mask_b01.jpg is 10x10, its image b01.jpg 40x32"):
        multi_subject.read_metadata(folder)


def test_a_prior_set_reads_as_mudi_ships_it(tmp_path):
    folder = write_prior(tmp_path / "reg" / "actionfigure_2_and_dog0")
    prior = multi_subject.read_metadata(folder)
    assert prior.file.name == "class_metadata.jsonl"
    assert prior.subjects == PRIOR_CLASSES and len(prior.images) == 4
    assert [(i.subject, i.image.name, i.mask.name, i.text) for i in prior.of("b")] == [
        ("b", "b00.png", "mask_b00.png", "A photo of a Corgi"), ("b", "b01.png", "mask_b01.png", "A photo of a Corgi")]


@pytest.mark.parametrize("lines, message", [
    ([_row(id="c"), _row(id="b", file_name="b00.png", mask_path="mask_b00.png")],
     r"class_metadata.jsonl, line 2: id 'c' is not a subject of line 1"),
    ([_row(file_name="a00.png", mask_path="mask_a00.png")], r"class_metadata.jsonl: subject 'b' \('Corgi'\) has no image"),
])
def test_a_bad_prior_set_is_named_with_its_line(tmp_path, lines, message):
    folder = write_prior(tmp_path / "reg", lines=lines)
    with pytest.raises(multi_subject.MultiSubjectDataError, match=message):
        multi_subject.read_metadata(folder)


def test_a_prior_mask_of_another_size_is_named(tmp_path):
    folder = write_prior(tmp_path / "reg")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "mask_a01.png")
    with pytest.raises(multi_subject.MultiSubjectDataError,
                       match=r"class_metadata.jsonl, line 3: mask mask_a01.png is 10x10, its image a01.png 40x32"):
        multi_subject.read_metadata(folder)


def test_a_folder_without_metadata_is_named(tmp_path):
    with pytest.raises(multi_subject.MultiSubjectDataError, match="no metadata.jsonl or class_metadata.jsonl"):
        multi_subject.read_metadata(tmp_path)


# ---------------------------------------------------------------------------------------------
# Seg-Mix


def _mix(data, index, seed, **kwargs):
    return multi_subject.segmix_example(data, index, np.random.default_rng(seed), 64, probability=1.0, **kwargs)


def test_segmix_is_a_pure_function_of_its_seed(tmp_path):
    data = multi_subject.read_metadata(write_dataset(tmp_path / "set"))
    one, again, other = _mix(data, 0, 7), _mix(data, 0, 7), _mix(data, 0, 8)
    np.testing.assert_array_equal(one.pixels, again.pixels)
    np.testing.assert_array_equal(one.mask, again.mask)
    assert one.caption == again.caption
    assert not np.array_equal(one.pixels, other.pixels)


def test_segmix_masks_and_captions_line_up(tmp_path):
    data = multi_subject.read_metadata(write_dataset(tmp_path / "set", solid=True))
    for seed in range(20):
        for index, subject in ((0, "a"), (2, "b")):
            example = _mix(data, index, seed)
            other = "b" if subject == "a" else "a"
            assert example.mixed and example.pixels.shape == (64, 64, 3) and example.mask.shape == (64, 64)
            assert example.caption == f"a photo of a {SUBJECTS[subject]} and a {SUBJECTS[other]}, simple background."
            inside, outside = example.pixels[example.mask > 0], example.pixels[example.mask == 0]
            assert (outside == 255).all(), "white wherever no subject is"
            colours = {tuple(int(v) for v in p) for p in inside}
            assert colours == {COLOURS["a"], COLOURS["b"]}, "both subjects, and only them, under the mask"


def test_segmix_probabilities_hold_over_many_draws(tmp_path):
    data = multi_subject.read_metadata(write_dataset(tmp_path / "set", solid=True))
    rng = np.random.default_rng(0)
    draws = [multi_subject.segmix_example(data, i, rng, 32, probability=0.3) for i in range(1500)]
    mixed = [d for d in draws if d.mixed]
    assert abs(len(mixed) / len(draws) - 0.3) < 0.04
    # The example's own subject lies left about half of the time (the colour of the leftmost
    # masked column: the left subject starts within the left quarter, the right one beyond it).
    left_is_own = []
    for i, d in enumerate(draws):
        if d.mixed:
            own = COLOURS[data.images[i % len(data.images)].subject]
            column = int(np.nonzero(d.mask.any(axis=0))[0][0])
            left = d.pixels[:, column][d.mask[:, column] > 0][0]
            left_is_own.append(tuple(int(v) for v in left) == own)
    assert abs(np.mean(left_is_own) - 0.5) < 0.06
    unmixed = next(d for d in draws if not d.mixed)
    assert (unmixed.mask == 1).all() and unmixed.caption.startswith("A photo of a")


def test_relative_scale_fixes_each_subjects_size(tmp_path):
    data = multi_subject.read_metadata(write_dataset(tmp_path / "set", solid=True))
    assert multi_subject.relative_scales(0.5) == (1.0, 0.5)
    assert multi_subject.relative_scales(-0.5) == (0.5, 1.0)
    assert multi_subject.relative_scales(0.0) is None
    with pytest.raises(ValueError, match="must lie in"):
        multi_subject.relative_scales(1.5)
    for index in (0, 2):  # "a" and "b" as the example's own subject: "b" stays the smaller one
        example = _mix(data, index, 3, relative_scale=0.5)
        areas = {name: int((example.pixels == colour).all(axis=-1).sum()) for name, colour in COLOURS.items()}
        assert 0.15 < areas["b"] / areas["a"] < 0.35  # (1/2)^2 of the area, up to rounding and overlap


def test_soft_mask_weights_pixels_at_latent_resolution():
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1
    weight = multi_subject.soft_mask(mask, (8, 8), 0.25)
    assert weight.shape == (8, 8)
    np.testing.assert_allclose(weight[:, :3], 1.0)
    np.testing.assert_allclose(weight[:, 5:], 0.25)
    np.testing.assert_allclose(multi_subject.soft_mask(np.ones((64, 64)), (8, 8), 0.0), 1.0)
