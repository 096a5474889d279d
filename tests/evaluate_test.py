"""Tests for gal_jax.evaluate: metric wiring, concepts lists, image folders, results files, command."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gal_jax import eval_results, evaluate, io_utils, metrics, tiny_data
from gal_jax.dino import DinoEmbedder

# ---------------------------------------------------------------------------------------------
# Fakes: an image's embedding is its top-left pixel, so a test chooses embeddings by painting.


def painted(*vectors) -> np.ndarray:
    """Returns uint8 2x2 images whose top-left pixel is each vector (the fake embedding)."""
    images = np.zeros((len(vectors), 2, 2, 3), np.uint8)
    images[:, 0, 0] = np.asarray(vectors, np.uint8)
    return images


class FakeScorer:
    """Embeds an image as its normalised top-left pixel and a prompt by table lookup."""

    def __init__(self, texts: dict[str, tuple]):
        self.texts = texts
        self.text_calls: list[list[str]] = []

    def image_embeddings(self, images):
        vectors = np.asarray(images)[:, 0, 0].astype(np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def text_embeddings(self, prompts):
        self.text_calls.append(list(prompts))
        vectors = np.asarray([self.texts[p] for p in prompts], np.float64)  # KeyError: unexpected prompt
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class FakeDino:
    """Embeds an image as its normalised bottom-right pixel."""

    def image_embeddings(self, images):
        vectors = np.asarray(images)[:, -1, -1].astype(np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# Generated images g1 = (1,0,0), g2 = (0,1,0), g3 = (.6,.8,0) (painted as 3:4); prompts p1 = (1,0,0)
# for g1, g2 and p2 = (0,1,0) for g3; caption (.8,.6,0); references (1,0,0) and (0,1,0).
GENERATED = painted((5, 0, 0), (0, 5, 0), (3, 4, 0))
REFERENCES = painted((7, 0, 0), (0, 7, 0))
TEXTS = {"cat on a beach": (1, 0, 0), "cat in the snow": (0, 1, 0), "a cat on the stairs": (4, 3, 0)}
PROMPTS = ["cat on a beach", "cat on a beach", "cat in the snow"]


def test_metrics_match_a_hand_computation():
    result = evaluate.evaluate_images(FakeScorer(TEXTS), GENERATED, PROMPTS, REFERENCES, ["a cat on the stairs"],
                                      txt_scale=2.5)
    # cos to own prompt: 1, 0, .8 -> TXT-ALN = 2.5 * 1.8 / 3.
    assert result["txt_aln"] == pytest.approx(2.5 * 1.8 / 3)
    # cos to references: (1, 0), (0, 1), (.6, .8) -> IMG-ALN = 3.4 / 6.
    assert result["img_aln"] == pytest.approx(3.4 / 6)
    # cos to the caption: .8, .6, .96; overfit where prompt cos < caption cos: images 2 and 3.
    assert result["ovf"] == pytest.approx(2 / 3)
    assert [image["overfit"] for image in result["per_image"]] == [False, True, True]
    np.testing.assert_allclose([image["sim_prompt"] for image in result["per_image"]], [1.0, 0.0, 0.8], atol=1e-12)
    np.testing.assert_allclose([image["sim_captions"] for image in result["per_image"]], [[.8], [.6], [.96]],
                               atol=1e-12)
    assert result["counts"] == {"images": 3, "prompts": 2, "references": 2, "captions": 1}
    assert result["settings"] == {"txt_scale": 2.5}
    assert "dino" not in result


def test_overfit_needs_the_caption_strictly_closer_than_the_prompt():
    texts = {"cat on a beach": (3, 4, 0), "a cat on the stairs": (3, 4, 0)}
    result = evaluate.evaluate_images(FakeScorer(texts), painted((1, 2, 0)), ["cat on a beach"], REFERENCES,
                                      ["a cat on the stairs"])
    assert result["ovf"] == 0.0


def test_each_distinct_prompt_is_embedded_once():
    scorer = FakeScorer(TEXTS)
    evaluate.evaluate_images(scorer, GENERATED, PROMPTS, REFERENCES, ["a cat on the stairs"])
    assert scorer.text_calls == [["cat on a beach", "cat in the snow"], ["a cat on the stairs"]]


def test_dino_is_the_mean_cosine_over_generated_and_reference_pairs():
    generated, references = GENERATED.copy(), REFERENCES.copy()
    generated[:, -1, -1] = [(1, 0, 0), (1, 1, 0), (0, 0, 1)]
    references[:, -1, -1] = [(1, 0, 0), (0, 0, 1)]
    result = evaluate.evaluate_images(FakeScorer(TEXTS), generated, PROMPTS, references, ["a cat on the stairs"],
                                      dino=FakeDino())
    half = math.sqrt(0.5)
    assert result["dino"] == pytest.approx((1 + 0 + half + 0 + 0 + 1) / 6)


@pytest.mark.parametrize(
    "prompts, captions, references, problem",
    [
        (PROMPTS[:2], ["a cat on the stairs"], REFERENCES, "3 images but 2 test prompts"),
        (PROMPTS, [], REFERENCES, "at least one plain reference caption"),
        (PROMPTS, ["a cat on the stairs"], REFERENCES[:0], "at least one reference image"),
    ],
)
def test_evaluate_images_rejects_inconsistent_inputs(prompts, captions, references, problem):
    with pytest.raises(ValueError, match=problem):
        evaluate.evaluate_images(FakeScorer(TEXTS), GENERATED, prompts, references, captions)


class FakeGenerator:
    """Paints each image with the vector of its generation prompt; records the calls."""

    settings = {"sampler": "pndm", "steps": 50, "guidance_scale": 7.5}

    def __init__(self, vectors: dict[str, tuple]):
        self.vectors, self.calls = vectors, []

    def generate(self, params, prompts, prompt_ids, round_index, num_per_prompt, base_seed, desc="generate"):
        self.calls.append((list(prompts), list(prompt_ids), round_index, num_per_prompt, base_seed))
        self.desc = desc
        return painted(*[self.vectors[p] for p in prompts for _ in range(num_per_prompt)])


def object_concept(**overrides) -> evaluate.EvalConcept:
    fields = dict(name="cat", kind="object", class_prompt="cat", placeholder="<cute-cat>", style_descriptor=None,
                  test_prompts=("cat on a beach", "cat in the snow"), captions=("a cat on the stairs",))
    return evaluate.EvalConcept(**{**fields, **overrides})


def test_evaluate_model_generates_with_the_placeholder_and_scores_without_it():
    generator = FakeGenerator({"<cute-cat> cat on a beach": (1, 0, 0), "<cute-cat> cat in the snow": (4, 3, 0)})
    scorer = FakeScorer(TEXTS)  # knows no prompt with the placeholder: scoring one raises KeyError
    result = evaluate.evaluate_model(generator, scorer, "params", object_concept(), REFERENCES,
                                     num_per_prompt=2, seed=7, txt_scale=1.0)
    assert generator.calls == [(["<cute-cat> cat on a beach", "<cute-cat> cat in the snow"], [0, 1],
                                evaluate.EVAL_ROUND_INDEX, 2, 7)]
    assert [image["prompt"] for image in result["per_image"]] == [
        "cat on a beach", "cat on a beach", "cat in the snow", "cat in the snow"]
    assert result["txt_aln"] == pytest.approx((1 + 1 + 0.6 + 0.6) / 4)
    assert result["ovf"] == pytest.approx(0.5)  # snow images: .6 to the prompt < .96 to the caption
    assert result["concept"] == "cat" and result["settings"] == {
        "txt_scale": 1.0, "num_per_prompt": 2, "seed": 7, "sampler": "pndm", "steps": 50, "guidance_scale": 7.5}


def test_the_evaluation_generator_follows_config_eval_not_the_loops_sampler(loaded_sd):
    from configs import tiny_cpu
    from gal_jax import sample, sharding

    config = tiny_cpu.get_config()
    config.eval.update(sampler="pndm", steps=3, guidance_scale=5.0)
    generator = sample.Generator.from_config(config, loaded_sd[0], sharding.make_mesh(), section="eval")
    assert generator.settings == {"sampler": "pndm", "steps": 3, "guidance_scale": 5.0}
    assert generator.sampler.num_steps == 4  # PLMS calls the UNet once more than its step count
    assert generator.max_images_per_device == config.sample.max_images_per_device
    loop = sample.Generator.from_config(config, loaded_sd[0], sharding.make_mesh())
    assert loop.settings == {"sampler": "ddim", "steps": 10, "guidance_scale": 7.5}


def test_style_concept_generates_and_scores_with_the_style_descriptor():
    concept = object_concept(kind="style", placeholder=None, style_descriptor="in watercolor painting style",
                             test_prompts=("a fox",), captions=("A cat in watercolor painting style",))
    assert concept.generation_prompts() == concept.scoring_prompts() == ["a fox in watercolor painting style"]


# ---------------------------------------------------------------------------------------------
# Concepts lists.


def test_reads_the_tiny_concepts_list(tmp_path):
    paths = tiny_data.make_tiny_concepts(tmp_path / "data")
    [concept] = evaluate.read_concepts_list(paths["concepts_json"])
    assert concept.name == "teapot" and concept.kind == "object" and concept.placeholder == tiny_data.PLACEHOLDER
    assert concept.test_prompts == tiny_data.TEST_PROMPTS
    assert concept.captions == ("a teapot on a table", "a teapot on the grass")
    assert concept.generation_prompts()[0] == "<tiny-teapot> teapot on a beach"


POT_PROMPTS = "Photo of wooden pot\n\nwooden pot in a pool \n"  # a blank line and a trailing space, as theirs


def write_authors_repo(root: Path, entries: list[dict], prompts: str = POT_PROMPTS):
    """Writes the authors' layout: repo/data/concepts_list.json naming ./data/test_prompts/... from repo/."""
    (root / "data" / "test_prompts").mkdir(parents=True)
    (root / "data" / "test_prompts" / "wooden_pot.txt").write_text(prompts)
    (root / "data" / "concepts_list.json").write_text(json.dumps(entries))
    return root / "data" / "concepts_list.json"


AUTHORS_ENTRY = {"class_prompt": "wooden_pot", "placeholder": "<wooden-pot>",
                 "test_prompts": "./data/test_prompts/wooden_pot.txt",
                 "caption": ["wooden pot on the table", "wooden pot next to the window"]}


def test_reads_the_authors_layout_with_paths_from_their_repo_root(tmp_path):
    listing = write_authors_repo(tmp_path / "repo", [AUTHORS_ENTRY])
    [concept] = evaluate.read_concepts_list(listing)
    assert concept.name == "wooden_pot"
    assert concept.test_prompts == ("Photo of wooden pot", "wooden pot in a pool")
    assert concept.generation_prompts() == ["Photo of <wooden-pot> wooden pot", "<wooden-pot> wooden pot in a pool"]
    assert concept.reference_images == ()


def test_reads_a_reference_folder_and_an_absolute_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("wooden pot on a boat\n")
    for name in ("b.png", "a.png"):
        io_utils.write_png(tmp_path / "refs" / name, np.zeros((4, 4, 3), np.uint8))
    entry = {**AUTHORS_ENTRY, "test_prompts": str(prompts), "instance_data_dir": "refs"}
    (tmp_path / "list.json").write_text(json.dumps([entry]))
    [concept] = evaluate.read_concepts_list(tmp_path / "list.json")
    assert concept.test_prompts == ("wooden pot on a boat",)
    assert [p.name for p in concept.reference_images] == ["a.png", "b.png"]


def test_reads_the_authors_style_list_with_parti_prompts(tmp_path):
    (tmp_path / "PartiPrompts.csv").write_text("Prompt,Category,Challenge,Note\nan F1,Vehicles,Basic,\n"
                                               "a snail,Animals,Basic,\n")
    io_utils.write_png(tmp_path / "cat" / "original.jpg", np.zeros((4, 4, 3), np.uint8))
    entry = {"class_prompt": "cat", "instance_prompt": "A cat in watercolor painting style",
             "instance_data_path": "cat/original.jpg"}
    (tmp_path / "styles.json").write_text(json.dumps([entry]))
    [concept] = evaluate.read_concepts_list(tmp_path / "styles.json")
    assert concept.kind == "style" and concept.style_descriptor == "in watercolor painting style"
    assert concept.captions == ("A cat in watercolor painting style",)
    assert concept.scoring_prompts() == ["an F1 in watercolor painting style", "a snail in watercolor painting style"]
    assert concept.reference_images == ((tmp_path / "cat" / "original.jpg").resolve(),)


@pytest.mark.parametrize(
    "entries, error, problem",
    [
        ({"class_prompt": "cat"}, evaluate.ConceptsListError, "non-empty JSON list"),
        ([], evaluate.ConceptsListError, "non-empty JSON list"),
        (["cat"], evaluate.ConceptsListError, "entry 0: expected an object"),
        ([{k: v for k, v in AUTHORS_ENTRY.items() if k != "placeholder"}], evaluate.ConceptsListError,
         "entry 0: missing key 'placeholder'"),
        ([AUTHORS_ENTRY, {**AUTHORS_ENTRY, "caption": []}], evaluate.ConceptsListError, "entry 1: key 'caption'"),
        ([AUTHORS_ENTRY, {**AUTHORS_ENTRY, "test_prompts": "./data/nope.txt"}], FileNotFoundError,
         r"entry 1: 'test_prompts': './data/nope.txt' not found; tried"),
        ([AUTHORS_ENTRY, AUTHORS_ENTRY], evaluate.ConceptsListError, "entries 0 and 1 both name the concept"),
        ([{**AUTHORS_ENTRY, "kind": "scene"}], evaluate.ConceptsListError, "'kind' is 'scene'"),
    ],
)
def test_concepts_list_errors_name_the_file_and_entry(tmp_path, entries, error, problem):
    listing = write_authors_repo(tmp_path / "repo", entries)
    with pytest.raises(error, match=problem) as raised:
        evaluate.read_concepts_list(listing)
    assert str(listing) in str(raised.value)


def test_test_prompt_without_the_class_word_is_reported_with_its_file_and_number(tmp_path):
    listing = write_authors_repo(tmp_path / "repo", [AUTHORS_ENTRY], prompts="wooden pot in a pool\na handbag\n")
    with pytest.raises(evaluate.ConceptsListError, match=r"wooden_pot.txt: prompt 2: class word 'wooden_pot'"):
        evaluate.read_concepts_list(listing)


def test_empty_prompt_file_is_refused(tmp_path):
    listing = write_authors_repo(tmp_path / "repo", [AUTHORS_ENTRY], prompts="\n  \n")
    with pytest.raises(evaluate.ConceptsListError, match="wooden_pot.txt: no prompts"):
        evaluate.read_concepts_list(listing)


# ---------------------------------------------------------------------------------------------
# Image folders with the tiny CLIP.


@pytest.fixture(scope="module")
def clip_scorer(tiny_models):
    from gal_jax import models, score, sharding

    clip, params = models.load_clip(tiny_models["clip"])
    return score.Scorer(clip, params, sharding.make_mesh())


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    references = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    for i, image in enumerate(generated):
        io_utils.write_png(root / "images" / f"{i:02d}.png", image)
    for i, image in enumerate(references):
        io_utils.write_png(root / "refs" / f"{i}.png", image)
    prompts = ["teapot on a beach", "teapot on a beach", "teapot in the snow", "a golden color teapot"]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {"root": root, "generated": generated, "references": references, "prompts": prompts}


CAPTIONS = ["a teapot on a table", "a teapot on the grass"]


def direct_metrics(scorer, images, prompts, references, captions):
    image_emb = np.asarray(scorer.image_embeddings(images))
    prompt_emb = np.asarray(scorer.text_embeddings(prompts))
    caption_emb = np.asarray(scorer.text_embeddings(captions))
    return {
        "txt_aln": metrics.txt_alignment(image_emb, prompt_emb),
        "img_aln": metrics.img_alignment(image_emb, np.asarray(scorer.image_embeddings(references))),
        "ovf": metrics.overfit_fraction(image_emb, prompt_emb, caption_emb),
    }


def test_evaluate_folder_equals_the_scorer_and_metrics_directly(tiny_models, clip_scorer, image_folders):
    root = image_folders["root"]
    result = evaluate.evaluate_folder(root / "images", root / "prompts.txt", root / "refs", CAPTIONS,
                                      tiny_models["clip"])
    expected = direct_metrics(clip_scorer, image_folders["generated"], image_folders["prompts"],
                              image_folders["references"], CAPTIONS)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert result["concept"] == "images" and result["round"] is None
    assert result["counts"] == {"images": 4, "prompts": 3, "references": 3, "captions": 2}


def test_evaluate_folder_refuses_a_prompt_count_that_does_not_match(tiny_models, image_folders, tmp_path):
    (tmp_path / "short.txt").write_text("teapot on a beach\n")
    root = image_folders["root"]
    with pytest.raises(ValueError, match="holds 4 images but .*short.txt has 1 prompts"):
        evaluate.evaluate_folder(root / "images", tmp_path / "short.txt", root / "refs", CAPTIONS, tiny_models["clip"])


def test_mixed_size_images_are_resized_and_cropped_as_clip_image_processor_does(tmp_path):
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 70, 3), (90, 50, 3), (64, 64, 3))]
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, image in zip(paths, images):
        io_utils.write_png(path, image)
    loaded = evaluate.load_images(paths, 32)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   do_rescale=False, do_normalize=False)
    expected = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert loaded.shape == (3, 32, 32, 3) and loaded.dtype == np.uint8
    np.testing.assert_allclose(loaded, expected, atol=1)


def test_same_size_images_are_loaded_unchanged(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (2, 40, 70, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        io_utils.write_png(tmp_path / f"{i}.png", image)
    np.testing.assert_array_equal(evaluate.load_images([tmp_path / "0.png", tmp_path / "1.png"], 32), images)


# ---------------------------------------------------------------------------------------------
# DINOv2 on a tiny random-init model in the transformers layout.


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                          image_size=56)
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_dino_embeddings_are_the_normalised_mean_of_the_last_hidden_state(tiny_dino):
    import torch
    from transformers import BitImageProcessor, Dinov2Model

    images = np.random.default_rng(3).integers(0, 256, (3, 60, 80, 3), dtype=np.uint8)
    embeddings = DinoEmbedder(tiny_dino, batch_size=2).image_embeddings(images)
    model, processor = Dinov2Model.from_pretrained(tiny_dino), BitImageProcessor.from_pretrained(tiny_dino)
    with torch.no_grad():
        hidden = model(**processor(images=list(images), return_tensors="pt")).last_hidden_state.numpy()
    expected = hidden.mean(axis=1) / np.linalg.norm(hidden.mean(axis=1), axis=1, keepdims=True)
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_dino_similarity_is_one_for_the_reference_itself_and_less_for_another_image(tiny_dino):
    images = np.random.default_rng(4).integers(1, 256, (2, 60, 60, 3), dtype=np.uint8)
    embedder = DinoEmbedder(tiny_dino)
    dino = [evaluate.evaluate_images(FakeScorer(TEXTS), images[i : i + 1], ["cat on a beach"], images[:1],
                                     ["a cat on the stairs"], dino=embedder)["dino"] for i in (0, 1)]
    assert dino[0] == pytest.approx(1.0, abs=1e-6)
    assert dino[1] < 1.0 - 1e-4


def test_dino_embedder_refuses_a_folder_without_a_preprocessor(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        DinoEmbedder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Results files and the command.


def result(concept, round_index, txt, img, ovf, **extra):
    return {"concept": concept, "round": round_index, "txt_aln": txt, "img_aln": img, "ovf": ovf,
            "counts": {"images": 20, "references": 4}, "settings": {"txt_scale": 1.0}, **extra}


def test_markdown_has_a_table_per_concept_and_the_mean_per_round(tmp_path):
    results = [result("cat", 2, 0.31, 0.77, 0.25), result("cat", 1, 0.30, 0.80, 0.35),
               result("dog", 1, 0.20, 0.60, 0.15, dino=0.5)]
    json_path, md_path = eval_results.write_results(results, tmp_path / "eval")
    assert json.loads(json_path.read_text()) == results
    lines = md_path.read_text().splitlines()
    cat = lines.index("## cat")
    assert lines[cat + 2] == "| round | TXT-ALN | IMG-ALN | OVF (lower is better) | DINO | images | references |"
    assert lines[cat + 4 : cat + 6] == ["| 1 | 0.3000 | 0.8000 | 0.3500 |  | 20 | 4 |",
                                        "| 2 | 0.3100 | 0.7700 | 0.2500 |  | 20 | 4 |"]
    assert "| 1 | 0.2000 | 0.6000 | 0.1500 | 0.5000 | 20 | 4 |" in lines
    mean = lines.index("## Mean over concepts")
    assert lines[mean + 4 : mean + 6] == ["| 1 | 2 | 0.2500 | 0.7000 | 0.2500 | 0.5000 |",
                                          "| 2 | 1 | 0.3100 | 0.7700 | 0.2500 |  |"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["results.json", "results.md"]


def test_markdown_refuses_a_result_without_a_metric():
    with pytest.raises(ValueError, match="result #0 has no 'ovf'"):
        eval_results.results_markdown([{"concept": "cat", "txt_aln": 0.3, "img_aln": 0.7}])


def test_command_without_round_results_says_how_to_enable_evaluation(tmp_path):
    (tmp_path / "rounds" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"--config.eval.enabled=true.*evaluate_folder"):
        evaluate.evaluate_command(tmp_path)


def test_command_gathers_the_round_results_in_round_order(tmp_path, capsys):
    for round_index in (10, 2):
        io_utils.write_json(tmp_path / "rounds" / str(round_index) / "eval.json",
                            [{k: v for k, v in result("cat", round_index, 0.3, 0.7, 0.1 * round_index).items()
                              if k != "round"}])
    md_path = evaluate.evaluate_command(tmp_path)
    assert md_path == tmp_path / "eval" / "results.md"
    gathered = io_utils.read_json(tmp_path / "eval" / "results.json")
    assert [(r["round"], r["ovf"]) for r in gathered] == [(2, 0.2), (10, 1.0)]
    assert "| 10 | 0.3000 | 0.7000 | 1.0000 |" in capsys.readouterr().out


def test_command_refuses_a_result_filed_under_another_round(tmp_path):
    io_utils.write_json(tmp_path / "rounds" / "2" / "eval.json", [result("cat", 3, 0.3, 0.7, 0.1)])
    with pytest.raises(ValueError, match=r"rounds/2/eval.json: a result says round 3"):
        evaluate.evaluate_command(tmp_path)


def test_command_scores_an_image_folder_by_its_index_json_without_the_placeholder(
        tiny_models, clip_scorer, image_folders, tmp_path):
    # Reversed order in the index: image i of the index is generated[3 - i]; no prompts file needed.
    prompts = ["a golden color teapot", "teapot in the snow", "teapot on a beach", "teapot on a beach"]
    index = [{"prompt": p.replace("teapot", "<tiny-teapot> teapot"), "seed": 0, "path": f"images/{3 - i:02d}.png"}
             for i, p in enumerate(prompts)]
    io_utils.write_json(image_folders["root"] / "index.json", index)
    try:
        md_path = evaluate.evaluate_command(tmp_path / "out", images=image_folders["root"],
                                            references=image_folders["root"] / "refs", captions=CAPTIONS,
                                            clip_path=tiny_models["clip"], placeholder="<tiny-teapot>")
    finally:
        (image_folders["root"] / "index.json").unlink()
    [gathered] = io_utils.read_json(tmp_path / "out" / "eval" / "results.json")
    expected = direct_metrics(clip_scorer, image_folders["generated"][::-1], prompts, image_folders["references"],
                              CAPTIONS)
    for key, value in expected.items():
        assert gathered[key] == pytest.approx(value, abs=1e-6), key
    assert [image["prompt"] for image in gathered["per_image"]] == prompts
    assert f"| - | {gathered['txt_aln']:.4f} | {gathered['img_aln']:.4f} |" in md_path.read_text()


def test_command_on_an_image_folder_needs_references(tmp_path):
    with pytest.raises(ValueError, match="--references"):
        evaluate.evaluate_command(tmp_path, images=tmp_path, captions=CAPTIONS, clip_path=tmp_path)


@pytest.mark.slow
def test_evaluate_model_runs_with_the_tiny_generator_and_scorer(tiny_models, clip_scorer, tmp_path):
    from gal_jax import models, sample

    paths = tiny_data.make_tiny_concepts(tmp_path / "data")
    [concept] = evaluate.read_concepts_list(paths["concepts_json"])
    sd, params = models.load_stable_diffusion(tiny_models["sd"])
    generator = sample.Generator(sd, clip_scorer.mesh, sampler="ddim", steps=2)
    references = sorted(paths["object_concept"].glob("*.jpg"))
    result = evaluate.evaluate_model(generator, clip_scorer, params, concept, references, num_per_prompt=2, seed=0)
    images = generator.generate(params, concept.generation_prompts(), range(5), evaluate.EVAL_ROUND_INDEX, 2, 0)
    expected = direct_metrics(clip_scorer, images, [p for p in concept.test_prompts for _ in range(2)],
                              evaluate.load_images(references, 224), concept.captions)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
