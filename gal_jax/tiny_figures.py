"""The tiny world's figures: what its trained models can do, and what GAL does with them.

Measured on the embedded tiny default (`tiny.make_tiny`), reported in README and checked by the
slow test `tests/tiny_figures_test.py`:

1. `clip_zero_shot`: the tiny CLIP names the context, object and colour of held-out world
   pictures, zero-shot (the best of every plain caption of the world), and the rule-based judge
   (`tiny_world_judge`) agrees with it.
2. `base_context_following`: the base tiny SD draws the context its prompt names, per anchor
   context, as the judge sees it.
3-4. `evaluate_run`: per finished round of a GAL run, the paper's TXT-ALN, IMG-ALN and OVF on the
   concept's test prompts (the same noise every round), and the share of images the judge sees in
   the prompt's context. `table` lays rounds and feedback modes out as the paper's Table 1.

Pure measurement: models are passed in or loaded from a run's workdir; nothing is trained here.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gal_jax import evaluate, outputs, personalize, sample, tiny_world, tiny_world_judge
from gal_jax.workdir import Workdir

ATTRIBUTES = ("context", "object", "colour")
HELD_OUT_SEED = 20_261_130  # held-out pictures: never the pretraining set's (seed, index) streams
FIGURE_SEED = 4_242  # generation noise of the base model's pictures


def held_out_scenes(count: int, seed: int = HELD_OUT_SEED) -> list[tiny_world.Scene]:
    """Returns `count` unstyled random scenes drawn apart from the pretraining set."""
    rng = np.random.default_rng([seed, count])
    return [tiny_world.sample_scene(rng) for _ in range(count)]


def caption_grid() -> tuple[list[str], tuple[int, int, int]]:
    """Returns every plain caption of the world, context-major, and the grid's shape
    (contexts, objects, colours)."""
    grid = itertools.product(tiny_world.CONTEXTS, tiny_world.OBJECTS, tiny_world.COLOURS)
    captions = [tiny_world.caption(obj, colour, "plain", context) for context, obj, colour in grid]
    return captions, (len(tiny_world.CONTEXTS), len(tiny_world.OBJECTS), len(tiny_world.COLOURS))


LABELS = {"context": tiny_world.CONTEXTS, "object": tiny_world.OBJECTS, "colour": tiny_world.COLOURS}


def clip_zero_shot(scorer, scenes: Sequence[tiny_world.Scene]) -> dict[str, Any]:
    """Returns figure 1: per attribute the CLIP's top-1 accuracy, the judge's accuracy, and how
    often the two agree, on `scenes` (with their true attributes).

    Zero-shot over the caption template: each picture is matched with every plain caption of the
    world ("a {colour} {object} {context}", `caption_grid`); the attributes of the most similar
    caption are the CLIP's answer.
    """
    images = np.stack([s.image for s in scenes])
    image_emb = np.asarray(scorer.image_embeddings(images))
    captions, shape = caption_grid()
    text_emb = np.asarray(scorer.text_embeddings(captions))
    best = np.unravel_index(np.argmax(image_emb @ text_emb.T, axis=1), shape)
    judged = [tiny_world_judge.judge_scene(s.image) for s in scenes]
    result: dict[str, Any] = {"images": len(scenes), "protocol": "best of every plain caption"}
    for name, indices in zip(ATTRIBUTES, best):
        predicted = [LABELS[name][i] for i in indices]
        truth = [getattr(s, name) for s in scenes]
        judge = [j[name] for j in judged]
        result[name] = {
            "clip_accuracy": _share(predicted, truth),
            "judge_accuracy": _share(judge, truth),
            "judge_agrees_with_clip": _share(judge, predicted),
        }
    return result


def vae_round_trips(sd, sd_params, scenes: Sequence[tiny_world.Scene], batch_size: int = 100) -> list[tiny_world.Scene]:
    """Returns the scenes with each picture replaced by its round trip through the SD's VAE
    (encoded, its posterior mean decoded): at best what the SD can draw of them."""
    import jax

    @jax.jit
    def round_trip(pixels):
        mean = sd.encode_posterior(sd_params.vae, pixels.astype(np.float32) / 127.5 - 1.0)[0]
        return sample.to_uint8(sd.decode_latents(sd_params.vae, mean))

    images = np.stack([s.image for s in scenes])
    decoded = np.concatenate([np.asarray(round_trip(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])
    return [dataclasses.replace(s, image=image) for s, image in zip(scenes, decoded, strict=True)]


def judge_on_round_trips(sd, sd_params, scenes: Sequence[tiny_world.Scene], batch_size: int = 100) -> dict[str, Any]:
    """Returns the judge's context accuracy on the SD's VAE round trips of `scenes` (each picture
    encoded, its posterior mean decoded): per context, the lowest, and overall.

    Figure 2 judges generated pictures, which are at best what the VAE can draw; this checks the
    judge against ground truth on such pictures (its accuracy on the world's own is figure 1's).
    """
    return judge_context_accuracy(vae_round_trips(sd, sd_params, scenes, batch_size))


def judge_context_accuracy(scenes: Sequence[tiny_world.Scene]) -> dict[str, Any]:
    """Returns the judge's context accuracy on the scenes' pictures against their true contexts:
    per context, the lowest, and overall."""
    judged = [tiny_world_judge.judge_context(s.image) for s in scenes]
    truth = [s.context for s in scenes]
    per_context = {c: _share([j for j, t in zip(judged, truth) if t == c], [c] * truth.count(c))
                   for c in tiny_world.CONTEXTS if c in truth}
    return {"images": len(scenes), "per_context": per_context, "min": min(per_context.values()),
            "accuracy": _share(judged, truth)}


def _share(a: Sequence, b: Sequence) -> float:
    return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))


def context_prompts(contexts: Sequence[str], per_context: int, seed: int = FIGURE_SEED) -> list[str]:
    """Returns `per_context` prompts "a {colour} {object} {context}" per context (random colour and
    object, seeded), context-major."""
    rng = np.random.default_rng(seed)
    return [
        tiny_world.caption(tiny_world.OBJECTS[rng.integers(len(tiny_world.OBJECTS))],
                           tiny_world.COLOURS[rng.integers(len(tiny_world.COLOURS))], "plain", context)
        for context in contexts for _ in range(per_context)
    ]


def base_context_following(generator: sample.Generator, params, per_context: int,
                           contexts: Sequence[str] = tiny_world.ANCHOR_CONTEXTS,
                           seed: int = FIGURE_SEED) -> dict[str, Any]:
    """Returns figure 2: per context, the share of the model's pictures of "a {colour} {object}
    {context}" the judge sees in that context (one picture per prompt), and the lowest share."""
    prompts = context_prompts(contexts, per_context, seed)
    images = np.asarray(generator.generate(params, prompts, range(len(prompts)), 0, 1, seed, desc="base model"))
    judged = [tiny_world_judge.judge_context(image) for image in images]
    shares = {c: _share(judged[i * per_context:(i + 1) * per_context], [c] * per_context)
              for i, c in enumerate(contexts)}
    return {"per_context": shares, "min": min(shares.values()), "mean": float(np.mean(list(shares.values()))),
            "images_per_context": per_context, "settings": generator.settings}


def judged_context_accuracy(images: np.ndarray, prompts: Sequence[str]) -> float:
    """Returns the share of images the judge sees in the context their prompt names."""
    wanted = tiny_world.prompt_contexts(prompts)
    return _share([tiny_world_judge.judge_context(image) for image in images], wanted)


@dataclasses.dataclass(frozen=True)
class RoundFigures:
    """A round's model on the concept's test prompts."""

    round: int  # 0: the base model
    txt_aln: float
    img_aln: float
    ovf: float
    judge_context: float  # share of images in the prompt's context, by the judge
    num_references: int  # training images of the round (references and queried images)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TestPromptEvaluation:
    """Evaluates models of the tiny concept on its test prompts, as figures 3-4 do: every model
    generates from the same noise (round index 0, `seed`) with the config's eval sampler; TXT-ALN
    and OVF score against the prompts without the placeholder, IMG-ALN against the references."""

    config: Any
    sd: Any  # the base model (outputs.load_base)
    params: Any
    mesh: Any
    scorer: Any
    concept: evaluate.EvalConcept
    references: np.ndarray
    num_per_prompt: int
    seed: int
    # One generator per model (one compile): a new token grows the tokenizer, so that round's
    # prompts are read by its own.
    _generators: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, config, *, num_per_prompt: int, seed: int = 8888) -> TestPromptEvaluation:
        """Loads the config's base SD and CLIP and the tiny concept's references."""
        from gal_jax import inputs, models, score, sharding

        paths = inputs.resolve(config, need=("sd", "clip"))
        sd, params = outputs.load_base(config)
        mesh = sharding.mesh_from_config(config.mesh)
        clip, clip_params = models.load_clip(paths.clip)
        concept = _tiny_concept(paths)
        return cls(config, sd, params, mesh, score.Scorer(clip, clip_params, mesh), concept,
                   evaluate.load_images(concept.reference_images, clip.image_size), num_per_prompt, seed)

    def figures(self, sd, params, *, progress: bool = False, desc: str = "") -> dict[str, float]:
        """Returns txt_aln, img_aln, ovf and judge_context of the model (sd, params); `sd` is the
        base's unless a new token grew its tokenizer."""
        if id(sd) not in self._generators:
            self._generators[id(sd)] = (sd, sample.Generator.from_config(self.config, sd, self.mesh, section="eval"))
        generator = self._generators[id(sd)][1]
        prompts = self.concept.generation_prompts()
        images = np.asarray(generator.generate(params, prompts, range(len(prompts)), evaluate.EVAL_ROUND_INDEX,
                                               self.num_per_prompt, self.seed, progress=progress, desc=desc))
        scoring = [p for p in self.concept.scoring_prompts() for _ in range(self.num_per_prompt)]
        result = evaluate.evaluate_images(self.scorer, images, scoring, self.references, self.concept.captions)
        return {"txt_aln": result["txt_aln"], "img_aln": result["img_aln"], "ovf": result["ovf"],
                "judge_context": judged_context_accuracy(images, scoring)}


def evaluate_run(workdir: Path | str, *, num_per_prompt: int, seed: int = 8888,
                 rounds: Sequence[int] | None = None, progress: bool = False) -> list[RoundFigures]:
    """Returns figures 3-4 for the finished rounds of a GAL run on the tiny world (all, or `rounds`),
    each round's model evaluated by `TestPromptEvaluation` with the run's config."""
    workdir = Workdir(workdir)
    config = outputs.run_config(workdir)
    method = personalize.method_name(config)
    evaluation = TestPromptEvaluation.from_config(config, num_per_prompt=num_per_prompt, seed=seed)
    figures = []
    for round_index in (rounds if rounds is not None else _finished_rounds(workdir.root, method)):
        sd, params = (evaluation.sd, evaluation.params) if round_index == 0 else outputs.round_model(
            config, evaluation.sd, evaluation.params, workdir.round(round_index).result(method))
        figures.append(RoundFigures(round=round_index, **evaluation.figures(sd, params, progress=progress,
                                                                          desc=f"round {round_index}"),
                                    num_references=_num_references(workdir, round_index)))
    return figures


def oracle_agreement(images: Sequence[np.ndarray], overfit: Sequence[bool]) -> dict[str, Any]:
    """Returns how GAL's overfit oracle (the CLIP, unless the run's gal.oracle says otherwise)
    compares with the judge on a round's pictures: the oracle calls a picture overfit when it looks
    more like the references' plain prompt than like its anchor prompt; the judge calls it so when
    it sees the references' context (the table).

    Claim 1 checks the CLIP against the judge on the world's own pictures; this checks it where GAL
    uses it, on the blurry pictures a personalized model draws.
    """
    if len(images) != len(overfit):
        raise ValueError(f"{len(images)} images but {len(overfit)} overfit flags")
    table = [tiny_world_judge.judge_context(image) == tiny_world.REFERENCE_CONTEXT for image in images]

    def fraction(flags):  # nan for none
        return float(np.mean(flags)) if len(flags) else float("nan")

    return {"images": len(images), "oracle_overfit": fraction(overfit), "judge_reference_context": fraction(table),
            "agree": _share(overfit, table), "oracle_finds": fraction([o for o, t in zip(overfit, table) if t])}


def oracle_against_judge(workdir: Path | str) -> list[dict[str, Any]]:
    """Returns `oracle_agreement` for every scored round of a tiny-world GAL run (its record's
    pictures and overfit flags), with the round's index."""
    from PIL import Image

    workdir = Workdir(workdir)
    rounds = []
    for record in workdir.read_records():
        scored = [image for direction in record.directions for image in direction.images]
        if not scored:
            continue
        pictures = [np.asarray(Image.open(workdir.resolve(image.path)).convert("RGB")) for image in scored]
        rounds.append({"round": record.round, **oracle_agreement(pictures, [image.overfit for image in scored])})
    return rounds


def oracle_table(oracle: dict[str, Sequence[dict[str, Any]]]) -> str:
    """Returns a markdown table of `oracle_against_judge` per feedback mode and round."""
    lines = ["| feedback | round | pictures | oracle: overfit | judge: the references' context | agree | "
             "oracle finds of the judge's |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, rounds in oracle.items():
        for r in rounds:
            lines.append(f"| {mode} | {r['round']} | {r['images']} | {r['oracle_overfit']:.3f} | "
                         f"{r['judge_reference_context']:.3f} | {r['agree']:.3f} | {r['oracle_finds']:.3f} |")
    return "\n".join(lines)


def _tiny_concept(paths) -> evaluate.EvalConcept:
    concepts = evaluate.read_concepts_list(paths.concepts_json)
    if len(concepts) != 1:
        raise ValueError(f"{paths.concepts_json}: expected the tiny world's one concept")
    from gal_jax import data

    references = tuple(r.image for r in data.load_concept(paths.concept))
    return dataclasses.replace(concepts[0], reference_images=references)


def _num_references(workdir: Workdir, round_index: int) -> int:
    """Returns how many images round `round_index` trained on (0 for the base model)."""
    return 0 if round_index == 0 else len(workdir.read_record(round_index).references)


def table(runs: dict[str, Sequence[RoundFigures]]) -> str:
    """Returns a markdown table: one row per (feedback mode, round), the paper's Table 1 columns
    (TXT-ALN up, IMG-ALN, OVF down) and the judge's context accuracy."""
    lines = ["| feedback | round | training images | TXT-ALN ↑ | IMG-ALN | OVF ↓ | judge: in context ↑ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, figures in runs.items():
        for f in figures:
            lines.append(f"| {mode} | {f.round} | {f.num_references} | {f.txt_aln:.4f} | {f.img_aln:.4f} | "
                         f"{f.ovf:.3f} | {f.judge_context:.3f} |")
    return "\n".join(lines)


def run_comparison(out: Path | str, config, modes: Sequence[str] = ("none", "random", "uncertainty"), *,
                   num_per_prompt: int = 4, progress: bool = True) -> dict[str, Any]:
    """Runs GAL on the tiny world once per feedback mode (workdirs out/<mode>, resumable) and
    returns figures 3-4: per mode, `evaluate_run` of the base model (round 0) and every round,
    with the markdown `table`; also written to out/figures.json and out/figures.md."""
    from gal_jax import driver, io_utils

    out = Path(out).expanduser().absolute()
    runs: dict[str, list[RoundFigures]] = {}
    base: list[RoundFigures] | None = None
    for mode in modes:
        mode_config = config.copy_and_resolve_references()
        mode_config.gal.feedback = mode
        if mode != modes[0]:
            share_round_one(out / modes[0], out / mode, personalize.method_name(mode_config))
        driver.run(mode_config, out / mode)
        figures = evaluate_run(out / mode, num_per_prompt=num_per_prompt, progress=progress,
                               rounds=None if base is not None else [0] + _finished_rounds(
                                   out / mode, personalize.method_name(mode_config)))
        if base is None:
            base, figures = figures[:1], figures[1:]
        runs[mode] = figures
    oracle = {mode: oracle_against_judge(out / mode) for mode in modes}
    result = {"base": [f.as_dict() for f in base or []],
              "runs": {mode: [f.as_dict() for f in figures] for mode, figures in runs.items()},
              "oracle": oracle,
              "num_per_prompt": num_per_prompt,
              "workdirs": {mode: str(out / mode) for mode in modes},
              "table": table({"base model": base or [], **runs}),
              "oracle_table": oracle_table(oracle)}
    io_utils.write_json(out / "figures.json", result)
    (out / "figures.md").write_text(result["table"] + "\n\n" + result["oracle_table"] + "\n")
    return result


def share_round_one(first: Path, target: Path, method: str) -> bool:
    """Puts the trained round 1 of the run at `first` into the new workdir `target`, before its run
    starts; returns whether it did. Round 1 trains on the references alone, the same for every
    feedback mode of one config, so a comparison trains it once (the driver loads a round's result
    folder where it finds one, as on resume; every mode's round 1 is still evaluated, and shows the
    same figures). A workdir that exists already is left as it is (a resumed comparison)."""
    from gal_jax import io_utils

    source, dest = Workdir(first).round(1), Workdir(target).round(1)
    if target.exists() or not source.result(method).is_dir() or not source.train_loss.is_file():
        return False
    dest.dir.mkdir(parents=True)
    io_utils.atomic_write_bytes(dest.train_loss, source.train_loss.read_bytes())
    staging = io_utils.temporary_dir_beside(dest.result(method))
    shutil.copytree(source.result(method), staging, dirs_exist_ok=True)
    io_utils.replace_dir(staging, dest.result(method))  # its presence marks the round as trained
    return True


def _finished_rounds(root: Path, method: str) -> list[int]:
    """Returns the rounds of the run at `root` that have a record and a result of `method`."""
    workdir = Workdir(root)
    return [r for r in workdir.round_indices()
            if workdir.round(r).record.is_file() and workdir.round(r).result(method).is_dir()]
