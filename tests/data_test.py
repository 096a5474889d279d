"""Tests of gal_jax.data: init.json parsing, preprocessing, the TFDS set, the grain iterator."""

import json
import tempfile
import zlib
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from gal_jax import data, input_pipeline, tiny_data

RESOLUTION = 16
CLASS_PROMPT = "a photo of a teapot"


def fake_tokenize(captions):
    """Hashes words into ids, CLIP-style start/end tokens, padded to 77."""
    ids = np.full((len(captions), 77), 49407, np.int32)
    for row, caption in enumerate(captions):
        words = [49406] + [zlib.crc32(w.encode()) % 49000 + 1 for w in caption.split()] + [49407]
        ids[row, : len(words)] = words[:77]
    return ids


def save_image(path: Path, pixels: np.ndarray) -> Path:
    """Writes uint8 pixels losslessly (PNG) or as JPEG, by suffix; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def solid_images(folder: Path, count: int, size=(20, 16), first_value=0) -> list[Path]:
    """Writes `count` PNGs of distinct solid grey levels; returns their paths."""
    return [
        save_image(folder / f"{i}.png", np.full((size[1], size[0], 3), first_value + 10 * i))
        for i in range(count)
    ]


def references(folder: Path, weights) -> list[data.Reference]:
    """Returns one Reference per weight, each with its own image and caption."""
    images = solid_images(folder, len(weights))
    return [
        data.Reference(image=p, prompt=f"a <sks> teapot number {i}", plain_prompt=None, weight=w)
        for i, (p, w) in enumerate(zip(images, weights))
    ]


def reference_of(input_ids: np.ndarray, refs) -> int:
    """Returns which reference a row of token ids belongs to."""
    ids = fake_tokenize([r.prompt for r in refs])
    matches = [i for i in range(len(refs)) if np.array_equal(ids[i], input_ids)]
    assert len(matches) == 1
    return matches[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_data.make_tiny_concepts(tmp_path_factory.mktemp("tiny") / "data", resolution=32)


def write_init(concept_dir: Path, entries) -> Path:
    concept_dir.mkdir(parents=True, exist_ok=True)
    (concept_dir / "init.json").write_text(json.dumps(entries))
    return concept_dir


def entry(path, **overrides):
    return {
        "instance_prompt": "a <sks> cat",
        "plain_prompt": "a cat",
        "instance_data_path": path,
        "weight": 1.0,
        **overrides,
    }


# ---------------------------------------------------------------------------------------------
# Layout parsing.


def test_load_concept_reads_the_tiny_object_concept(tiny):
    refs = data.load_concept(tiny["object_concept"])
    assert len(refs) == 4
    assert all(r.image.is_file() and r.image.parent == tiny["object_concept"] for r in refs)
    assert refs[0].prompt == "a <tiny-teapot> teapot on a table"
    assert refs[0].plain_prompt == "a teapot on a table"
    assert [r.weight for r in refs] == [1.0] * 4 and refs[0].source == "user"


def test_style_init_json_without_plain_prompt_loads(tiny):
    refs = data.load_concept(tiny["style_concept"])
    assert [r.plain_prompt for r in refs] == [None] * 4
    assert refs[0].prompt == "A cat in watercolor painting style"


@pytest.fixture
def user_layout(tmp_path):
    """A data root with a cat concept: images in the concept folder, in imgs/, and elsewhere."""
    concept = tmp_path / "reference_images" / "object" / "cat"
    pixels = np.zeros((8, 8, 3))
    save_image(concept / "0.jpg", pixels)
    save_image(concept / "imgs" / "1.jpg", pixels)
    save_image(tmp_path / "elsewhere" / "2.jpg", pixels)
    return tmp_path, concept


@pytest.mark.parametrize(
    "written, expected",
    [
        ("./reference_images/object/cat/0.jpg", "reference_images/object/cat/0.jpg"),  # data root
        ("0.jpg", "reference_images/object/cat/0.jpg"),  # concept folder
        ("./data/object/cat/imgs/1.jpg", "reference_images/object/cat/imgs/1.jpg"),  # authors' repo
        ("./data/object/cat/0.jpg", "reference_images/object/cat/0.jpg"),  # basename
        ("/nowhere/GAL/data/object/cat/0.jpg", "reference_images/object/cat/0.jpg"),  # foreign abs
        ("ABSOLUTE", "elsewhere/2.jpg"),
    ],
)
def test_image_paths_resolve_in_every_style(user_layout, written, expected):
    root, concept = user_layout
    if written == "ABSOLUTE":
        written = str(root / "elsewhere" / "2.jpg")
    write_init(concept, [entry(written)])
    assert data.load_concept(concept)[0].image == root / expected


def test_missing_image_error_names_file_entry_and_every_tried_path(user_layout):
    root, concept = user_layout
    write_init(concept, [entry("0.jpg"), entry("./reference_images/object/cat/imgs/9.jpg")])
    with pytest.raises(FileNotFoundError) as error:
        data.load_concept(concept)
    message = str(error.value)
    assert str(concept / "init.json") in message and "entry 1" in message
    tried = data.candidate_image_paths("./reference_images/object/cat/imgs/9.jpg", concept)
    assert concept / "imgs" / "9.jpg" in tried and concept / "9.jpg" in tried
    assert root / "reference_images/object/cat/imgs/9.jpg" in tried
    assert all(str(p) in message for p in tried)


def test_missing_key_error_names_file_entry_and_key(user_layout):
    _, concept = user_layout
    broken = entry("0.jpg")
    del broken["weight"]
    write_init(concept, [entry("0.jpg"), entry("0.jpg"), broken])
    with pytest.raises(data.DataError, match=r"init\.json: entry 2: missing key 'weight'"):
        data.load_concept(concept)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf"), "1.0", True, None])
def test_weight_must_be_a_finite_number_at_least_zero(user_layout, weight):
    _, concept = user_layout
    write_init(concept, [entry("0.jpg", weight=weight)])
    with pytest.raises(data.DataError, match=r"entry 0: key 'weight'"):
        data.load_concept(concept)


def test_zero_weight_is_allowed(user_layout):
    _, concept = user_layout
    write_init(concept, [entry("0.jpg", weight=0)])
    assert data.load_concept(concept)[0].weight == 0.0


@pytest.mark.parametrize("key", ["instance_prompt", "plain_prompt", "instance_data_path"])
def test_empty_strings_are_rejected(user_layout, key):
    _, concept = user_layout
    write_init(concept, [entry("0.jpg", **{key: "  "})])
    with pytest.raises(data.DataError, match=f"entry 0: key '{key}' must be a non-empty string"):
        data.load_concept(concept)


def test_init_json_that_is_not_a_list_is_rejected(user_layout):
    _, concept = user_layout
    (concept / "init.json").write_text('{"instance_prompt": "x"}')
    with pytest.raises(data.DataError, match="non-empty list"):
        data.load_concept(concept)


def test_concept_folder_without_init_json_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no init.json"):
        data.load_concept(tmp_path)


def test_list_class_images_accepts_the_concept_or_its_images_folder(tiny):
    from_images = data.list_class_images(tiny["reg_dir"])
    assert len(from_images) == tiny_data.NUM_CLASS_IMAGES
    assert data.list_class_images(tiny["reg_dir"].parent) == from_images


def test_list_class_images_of_an_empty_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class images"):
        data.list_class_images(tmp_path)


def test_load_reference_folder_gives_every_image_the_prompt_and_weight_one(tmp_path):
    solid_images(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    refs = data.load_reference_folder(tmp_path, "a <sks> dog")
    assert [r.image.name for r in refs] == ["0.png", "1.png", "2.png"]
    assert {(r.prompt, r.weight, r.plain_prompt) for r in refs} == {("a <sks> dog", 1.0, None)}


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def three_bands(width_per_band: int, height: int, vertical: bool = False) -> np.ndarray:
    """Returns a red | green | blue banded image (bands stacked top to bottom if vertical)."""
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    bands = np.repeat(colors, width_per_band, axis=0)  # (3 * width_per_band, 3)
    image = np.broadcast_to(bands[None], (height, 3 * width_per_band, 3))
    return np.ascontiguousarray(image.transpose(1, 0, 2) if vertical else image)


@pytest.mark.parametrize("vertical", [False, True])
def test_load_image_resizes_shorter_side_then_crops_the_centre(tmp_path, vertical):
    path = save_image(tmp_path / "bands.png", three_bands(48, 48, vertical))  # 144 x 48
    pixels = data.load_image(path, RESOLUTION)
    assert pixels.shape == (RESOLUTION, RESOLUTION, 3) and pixels.dtype == np.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # The 3:1 image shrinks to 48 x 16: the centred 16 x 16 crop is the green band; only the
    # bilinear filter's reach into the neighbouring bands may tint its outermost pixels.
    inner = pixels[:, 1:-1] if not vertical else pixels[1:-1]
    np.testing.assert_allclose(inner, np.broadcast_to([-1.0, 1.0, -1.0], inner.shape), atol=1e-6)


def test_load_image_without_resizing_is_an_exact_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (RESOLUTION, RESOLUTION + 7, 3)).astype(np.uint8)
    path = save_image(tmp_path / "noise.png", source)
    left = round(7 / 2)  # torchvision CenterCrop rounding
    expected = source[:, left : left + RESOLUTION] / 127.5 - 1.0
    np.testing.assert_allclose(data.load_image(path, RESOLUTION), expected, atol=1e-6)


def test_random_crops_and_flips_are_windows_of_the_resized_image(tmp_path):
    source = np.tile(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], (RESOLUTION, 1, 3))
    path = save_image(tmp_path / "ramp.png", source)  # 30 wide, 16 high: no resize
    windows = {
        tuple(source[0, left : left + RESOLUTION, 0]) for left in range(30 - RESOLUTION + 1)
    }
    seen_lefts, flips = set(), 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        row = data.load_image(path, RESOLUTION, random_crop=True, flip=True, rng=rng)
        row = np.rint((row[0, :, 0] + 1.0) * 127.5).astype(np.uint8)
        flipped = row[0] > row[-1]
        flips += flipped
        window = tuple(row[::-1] if flipped else row)
        assert window in windows
        seen_lefts.add(window[0])
    assert len(seen_lefts) > 3 and 0 < flips < 20


def test_random_crop_without_rng_is_an_error(tmp_path):
    path = save_image(tmp_path / "x.png", np.zeros((20, 20, 3)))
    with pytest.raises(ValueError, match="rng"):
        data.load_image(path, RESOLUTION, random_crop=True)


def test_corrupt_jpeg_error_names_the_file(tmp_path):
    good = save_image(tmp_path / "good.jpg", np.full((32, 32, 3), 128))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(data.DataError, match=r"corrupt\.jpg: cannot read image"):
        data.load_image(corrupt, RESOLUTION)
    ref = data.Reference(image=corrupt, prompt="a <sks> cat", plain_prompt=None, weight=1.0)
    with pytest.raises(data.DataError, match=r"corrupt\.jpg"):
        data.write_training_set([ref], [], None, tmp_path / "set", fake_tokenize, RESOLUTION)


def test_non_rgb_images_are_converted_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(path)  # mode L
    expected = np.ones((RESOLUTION, RESOLUTION, 3), np.float32)
    np.testing.assert_array_equal(data.load_image(path, RESOLUTION), expected)


# ---------------------------------------------------------------------------------------------
# The TFDS training set.


@pytest.mark.parametrize("n, m", [(3, 5), (5, 2)])
def test_record_i_pairs_instance_i_mod_n_with_class_i_mod_m(tmp_path, n, m):
    refs = references(tmp_path / "refs", [0.5 * (i + 1) for i in range(n)])
    classes = solid_images(tmp_path / "class", m, first_value=100)
    out = data.write_training_set(
        refs, classes, CLASS_PROMPT, tmp_path / "set", fake_tokenize, RESOLUTION
    )
    records, metadata = data.open_training_set(out)
    assert data.num_records(out) == len(records) == max(n, m)
    assert metadata["num_instances"] == n and metadata["num_class_images"] == m
    class_ids = fake_tokenize([CLASS_PROMPT])[0]
    for i in range(max(n, m)):
        record = records[i]
        assert record["instance_index"] == i % n and record["class_index"] == i % m
        assert record["weight"] == pytest.approx(refs[i % n].weight)
        instance_ids = fake_tokenize([refs[i % n].prompt])[0]
        np.testing.assert_array_equal(record["instance_ids"], instance_ids)
        np.testing.assert_array_equal(record["class_ids"], class_ids)
        assert record["instance_image"].shape == (RESOLUTION, 20, 3)  # shorter side resized
        assert np.all(record["instance_image"] == 10 * (i % n))
        assert np.all(record["class_image"] == 100 + 10 * (i % m))


def test_rewriting_a_set_replaces_it_and_leaves_no_temporary_folders(tmp_path):
    refs = references(tmp_path / "refs", [1.0, 1.0, 1.0])
    out = tmp_path / "sets" / "round1"
    data.write_training_set(refs, [], None, out, fake_tokenize, RESOLUTION)
    data.write_training_set(refs[:2], [], None, out, fake_tokenize, RESOLUTION)
    assert data.num_records(out) == 2
    assert [p.name for p in out.parent.iterdir()] == ["round1"]


def test_writing_a_set_leaves_nothing_in_the_system_temporary_folder(tmp_path, monkeypatch):
    # TFDS's bucket look-up made an empty tmp*tfds folder there for every set written.
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    data.write_training_set(references(tmp_path / "refs", [1.0, 1.0]), [], None, tmp_path / "set",
                            fake_tokenize, RESOLUTION)
    assert data.num_records(tmp_path / "set") == 2
    assert list(system_tmp.iterdir()) == []


def test_class_images_without_class_prompt_are_rejected(tmp_path):
    refs = references(tmp_path / "refs", [1.0])
    with pytest.raises(ValueError, match="class_prompt"):
        data.write_training_set(refs, [refs[0].image], "", tmp_path / "s", fake_tokenize, 16)


def test_tokenizer_of_the_wrong_shape_is_rejected(tmp_path):
    refs = references(tmp_path / "refs", [1.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(2, L\)"):
        data.write_training_set(refs, [], None, tmp_path / "s", lambda c: fake_tokenize(c[:1]), 16)


# ---------------------------------------------------------------------------------------------
# The grain iterator.


@pytest.fixture(scope="module")
def prior_set(tmp_path_factory):
    """A set of 4 weighted references (20 x 16 images) and 6 class images; 6 records."""
    root = tmp_path_factory.mktemp("prior_set")
    refs = references(root / "refs", [0.25, 0.5, 1.0, 2.0])
    classes = solid_images(root / "class", 6, first_value=100)
    out = data.write_training_set(
        refs, classes, CLASS_PROMPT, root / "set", fake_tokenize, RESOLUTION
    )
    return out, refs


def test_batches_interleave_each_instance_with_its_class_example(prior_set):
    out, refs = prior_set
    iterator = input_pipeline.make_train_iterator(out, global_batch_size=3, seed=0, resolution=RESOLUTION)
    batch = next(iterator)
    assert batch["pixel_values"].shape == (6, RESOLUTION, RESOLUTION, 3)
    assert batch["pixel_values"].dtype == np.float32 and batch["input_ids"].dtype == np.int32
    assert batch["input_ids"].shape == (6, 77) and batch["weight"].dtype == np.float32
    np.testing.assert_array_equal(batch["is_prior"], [False, True] * 3)
    for pair in range(3):
        instance, prior = 2 * pair, 2 * pair + 1
        ref = refs[reference_of(batch["input_ids"][instance], refs)]
        np.testing.assert_array_equal(batch["weight"][[instance, prior]], [ref.weight] * 2)
        np.testing.assert_array_equal(batch["input_ids"][prior], fake_tokenize([CLASS_PROMPT])[0])
        np.testing.assert_allclose(
            batch["pixel_values"][instance], data.load_image(ref.image, RESOLUTION), atol=1e-6
        )


def test_style_set_batches_are_instances_only(tmp_path):
    refs = references(tmp_path / "refs", [1.0, 0.01, 0.01])
    out = data.write_training_set(refs, [], None, tmp_path / "set", fake_tokenize, RESOLUTION)
    batch = next(input_pipeline.make_train_iterator(out, global_batch_size=2, seed=1, resolution=RESOLUTION))
    assert batch["pixel_values"].shape == (2, RESOLUTION, RESOLUTION, 3)
    assert not batch["is_prior"].any()


def process_references(out, refs, process_index, process_count, batches):
    iterator = input_pipeline.make_train_iterator(
        out, global_batch_size=2 * process_count, seed=3, resolution=RESOLUTION,
        process_index=process_index, process_count=process_count,
    )
    seen = []
    for _ in range(batches):
        batch = next(iterator)
        assert batch["pixel_values"].shape[0] == 2  # 2 records a process, no class half
        seen += [reference_of(ids, refs) for ids in batch["input_ids"]]
    return seen


def test_two_processes_read_disjoint_shards_that_cover_every_record(tmp_path):
    refs = references(tmp_path / "refs", [1.0] * 8)
    out = data.write_training_set(refs, [], None, tmp_path / "set", fake_tokenize, RESOLUTION)
    first = process_references(out, refs, 0, 2, batches=2)  # one epoch of 4 records each
    second = process_references(out, refs, 1, 2, batches=2)
    assert sorted(first + second) == list(range(8))


def test_uneven_shards_still_train_on_every_record(tmp_path):
    refs = references(tmp_path / "refs", [1.0] * 3)
    out = data.write_training_set(refs, [], None, tmp_path / "set", fake_tokenize, RESOLUTION)
    seen = [*process_references(out, refs, 0, 2, 1), *process_references(out, refs, 1, 2, 1)]
    assert set(seen) == {0, 1, 2}


@pytest.mark.parametrize("process_count", [2, 3])
def test_global_batches_do_not_depend_on_the_process_count(prior_set, process_count):
    """Each process's rows of every global batch, augmentation included: a run on one host and on
    several trains on the same batches (so they reach the same selections)."""

    def batches(process_index, count):
        iterator = input_pipeline.make_train_iterator(
            prior_set[0], global_batch_size=6, seed=5, resolution=RESOLUTION, random_crop=True,
            flip=True, process_index=process_index, process_count=count,
        )
        return [next(iterator) for _ in range(3)]  # 18 records: 3 epochs of the 6-record set

    parts = [batches(p, process_count) for p in range(process_count)]
    # Process p holds records [p * n, (p + 1) * n) of the global batch, each as (instance, class).
    joined = [{key: np.concatenate([part[b][key] for part in parts]) for key in parts[0][b]} for b in range(3)]
    assert_batches_equal(batches(0, 1), joined)


def test_one_process_reads_the_order_and_restores_the_states_of_earlier_versions(prior_set):
    """Earlier versions sharded grain's index space per process; for one process the order, and
    the sampler grain checks on restore, are unchanged, so their checkpoints still resume."""
    records, metadata = data.open_training_set(prior_set[0])
    earlier = iter(grain.DataLoader(
        data_source=input_pipeline._TrainingSource(records, metadata["fingerprint"]),
        sampler=grain.samplers.IndexSampler(
            num_records=len(records), shard_options=grain.sharding.ShardOptions(0, 1, True),
            shuffle=True, num_epochs=None, seed=7),
        operations=[input_pipeline._Preprocess(RESOLUTION, True, True), grain.transforms.Batch(2, drop_remainder=True),
                    input_pipeline._FlattenPairs()],
    ))
    current = augmented_iterator(prior_set[0])
    assert_batches_equal([next(earlier) for _ in range(4)], [next(current) for _ in range(4)])
    restored = augmented_iterator(prior_set[0])
    restored.set_state(earlier.get_state())
    assert_batches_equal([next(earlier) for _ in range(2)], [next(restored) for _ in range(2)])


def test_global_batch_must_divide_among_processes(prior_set):
    with pytest.raises(ValueError, match="multiple of process_count 2"):
        input_pipeline.make_train_iterator(
            prior_set[0], global_batch_size=3, seed=0, resolution=RESOLUTION, process_count=2
        )


def test_iterator_at_another_resolution_than_written_is_rejected(prior_set):
    with pytest.raises(ValueError, match="resolution 16, asked for 32"):
        input_pipeline.make_train_iterator(prior_set[0], global_batch_size=2, seed=0, resolution=32)


def test_finite_epochs_end_the_iterator(prior_set):
    iterator = input_pipeline.make_train_iterator(
        prior_set[0], global_batch_size=2, seed=0, resolution=RESOLUTION, num_epochs=2
    )
    assert len(list(iterator)) == 2 * 6 // 2


def assert_batches_equal(expected, actual):
    for want, got in zip(expected, actual, strict=True):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def augmented_iterator(out):
    return input_pipeline.make_train_iterator(
        out, global_batch_size=2, seed=7, resolution=RESOLUTION, random_crop=True, flip=True
    )


def test_restored_iterator_state_gives_identical_next_batches(prior_set):
    iterator = augmented_iterator(prior_set[0])
    for _ in range(4):  # past the 6-record epoch boundary
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = augmented_iterator(prior_set[0])
    restored.set_state(state)
    assert_batches_equal(expected, [next(restored) for _ in range(3)])


def test_iterator_state_round_trips_through_an_orbax_checkpoint(prior_set, tmp_path):
    iterator = augmented_iterator(prior_set[0])
    next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
    restored = augmented_iterator(prior_set[0])
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(expected, [next(restored) for _ in range(2)])


def test_state_of_another_data_set_is_refused(prior_set, tmp_path):
    refs = references(tmp_path / "refs", [1.0] * 6)
    other = data.write_training_set(refs, [], None, tmp_path / "set", fake_tokenize, RESOLUTION)
    state = augmented_iterator(prior_set[0]).get_state()
    with pytest.raises(ValueError, match="DataSource"):
        augmented_iterator(other).set_state(state)


def test_shuffle_order_is_fixed_by_the_seed(prior_set):
    def order(seed):
        iterator = input_pipeline.make_train_iterator(
            prior_set[0], global_batch_size=6, seed=seed, resolution=RESOLUTION
        )
        return [next(iterator)["input_ids"][::2].tolist() for _ in range(2)]

    assert order(0) == order(0)
    assert any(order(0) != order(seed) for seed in (1, 2, 3))


def _fingerprint_inputs(folder: Path):
    """Files of fixed bytes (the fingerprint hashes bytes, not pixels): two masked instances of
    subjects a and b, a queried image, two class images; token ids 0.."""
    def file(name, content):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
        return folder / name

    references = [
        data.Reference(file("a0.png", b"instance a0"), "a photo of <a> toy", None, 1.0,
                       mask=file("mask_a0.png", b"mask a0"), subject="a"),
        data.Reference(file("b0.png", b"instance b0"), "a photo of <b> dog", None, 0.5,
                       mask=file("mask_b0.png", b"mask b0"), subject="b"),
        data.Reference(file("q.png", b"queried"), "a queried image", None, 0.25, "round-1"),
    ]
    classes = [file("c0.png", b"class 0"), file("c1.png", b"class 1")]
    return references, classes, np.arange(4 * 77, dtype=np.int32).reshape(4, 77)


def test_fingerprints_of_sets_without_a_masked_prior_stay_as_they_were(tmp_path):
    """Existing workdirs resume: these values are those of the release before masked prior sets."""
    references, classes, ids = _fingerprint_inputs(tmp_path)
    assert data._fingerprint(references, classes, ids, 64) == "5a1706436bd01d3d"
    assert data._fingerprint(references, classes, ids, 64, ["a", "b"]) == "792f8669445880fa"
    assert data._fingerprint(references[2:], [], ids[:1], 32) == "dbaf74185e0ff694"


def test_a_masked_prior_sets_captions_and_masks_change_the_fingerprint(tmp_path):
    from gal_jax import multi_subject

    references, classes, ids = _fingerprint_inputs(tmp_path)
    (tmp_path / "mask_c0.png").write_bytes(b"class mask 0")
    (tmp_path / "mask_c1.png").write_bytes(b"class mask 1")
    prior = multi_subject.MultiSubjectSet(tmp_path / "class_metadata.jsonl", {"a": "toy", "b": "dog"}, tuple(
        multi_subject.SubjectImage(s, tmp_path / f"c{i}.png", tmp_path / f"mask_c{i}.png", f"a photo of a {w}", i + 2)
        for i, (s, w) in enumerate((("a", "toy"), ("b", "dog")))))
    ids = np.arange(5 * 77, dtype=np.int32).reshape(5, 77)  # 3 instance captions, 2 class captions
    first = data._fingerprint(references, classes, ids, 64, ["a", "b"], prior)
    assert first != data._fingerprint(references, classes, ids, 64, ["a", "b"])
    other_caption = ids.copy()
    other_caption[4, 3] += 1
    assert data._fingerprint(references, classes, other_caption, 64, ["a", "b"], prior) != first
    (tmp_path / "mask_c1.png").write_bytes(b"another class mask")
    assert data._fingerprint(references, classes, ids, 64, ["a", "b"], prior) != first
