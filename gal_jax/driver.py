"""The GAL loop on the host: train -> generate -> score -> query -> reweight, resumable.

Each round r leaves its work under `DIR/rounds/<r>/`, one file per finished step, so a rerun of the
same command continues where the last one stopped and never redoes finished work:

  train_set/        the round's training set (TFDS array_record)
  checkpoints/      orbax checkpoints of the round's training (the last one is the trained model)
  images/ + generated.json   generated PNGs and their (prompt, seed) index
  scores.json       CLIP similarities of every generated image
  review.html, selections.json   human feedback only
  record.json       the round's record: everything needed to recompute its decisions (written last)

The math lives in `acquisition.py`; this module only sequences steps and moves files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np

from gal_jax import (
    acquisition, anchors, data, evaluate, io_utils, models, report, review, sample, score, sharding, tiny,
    trainer,
)

FEEDBACK_MODES = ("uncertainty", "random", "human", "none")


class ConfigChangedError(ValueError):
    """A workdir is resumed with a config that differs from the one it was started with."""


class AwaitingHumanFeedback(RuntimeError):
    """The round waits for a person to pick directions on its review page."""


@dataclasses.dataclass(frozen=True)
class Concept:
    """The concept of an experiment: its original references and the prompts built from them."""

    kind: str
    references: tuple[data.Reference, ...]
    class_images: tuple[Path, ...]
    class_prompt: str
    phrase: str
    plain_prompts: tuple[str, ...]
    anchor_prompts: tuple[str, ...]  # the original pool; a prompt's index is its prompt_id


@dataclasses.dataclass
class Runtime:
    """Everything built once per run and reused by every round (models, compiled functions)."""

    config: ml_collections.ConfigDict
    workdir: Path
    concept: Concept
    sd: Any
    sd_params: Any
    trainer: Any
    generator: Any
    scorer: Any
    eval_concepts: tuple = ()  # evaluate.EvalConcept, when config.eval.enabled


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first config field that cannot work."""
    gal = config.gal
    if gal.feedback not in FEEDBACK_MODES:
        raise ValueError(f"config.gal.feedback={gal.feedback!r}; expected one of {FEEDBACK_MODES}")
    if config.data.kind not in ("object", "style"):
        raise ValueError(f"config.data.kind={config.data.kind!r}; expected 'object' or 'style'")
    if gal.rounds < 1 or gal.k < 1:
        raise ValueError(f"config.gal.rounds={gal.rounds} and config.gal.k={gal.k} must be >= 1")
    if gal.openness_lambda < 0:
        raise ValueError(f"config.gal.openness_lambda={gal.openness_lambda} must be >= 0")
    if config.sample.num_per_prompt < 1:
        raise ValueError(f"config.sample.num_per_prompt={config.sample.num_per_prompt} must be >= 1")


def load_concept(config: ml_collections.ConfigDict, concept_dir: Path, class_dir: Path | None) -> Concept:
    """Returns the concept: references, class images, concept phrase, plain and anchor prompts."""
    kind = config.data.kind
    references = tuple(data.load_concept(concept_dir))
    if kind == "object":
        placeholder, class_word = _placeholder_and_class(config, references, concept_dir)
        phrase = anchors.concept_phrase_object(placeholder, class_word)
        plain = [r.plain_prompt or r.prompt for r in references]
        class_prompt = config.data.class_prompt or f"a {anchors.class_noun(class_word)}"
    else:
        phrase = anchors.style_descriptor(references[0].prompt)
        plain = [r.prompt for r in references]
        class_prompt = config.data.class_prompt
    use_prior = kind == "object" and config.train.with_prior and class_dir is not None
    class_images = tuple(data.list_class_images(class_dir)) if use_prior else ()
    templates = anchors.get_anchor_templates(config.gal.anchors, kind)
    return Concept(
        kind=kind,
        references=references,
        class_images=class_images,
        class_prompt=class_prompt,
        phrase=phrase,
        plain_prompts=tuple(dict.fromkeys(" ".join(p.split()) for p in plain)),
        anchor_prompts=anchors.anchor_prompts(templates, phrase),
    )


def _placeholder_and_class(config, references, concept_dir) -> tuple[str, str]:
    """Returns (placeholder, class word) from the config, or read off the first reference's captions."""
    if config.data.placeholder and config.data.class_word:
        return config.data.placeholder, config.data.class_word
    first = references[0]
    plain_words = set((first.plain_prompt or "").lower().split())
    words = first.prompt.split()
    for i, word in enumerate(words[:-1]):
        if word.lower() not in plain_words and words[i + 1].lower() in plain_words:
            return config.data.placeholder or word, config.data.class_word or words[i + 1]
    raise ValueError(
        f"{concept_dir}/init.json: cannot find the placeholder in {first.prompt!r} vs its plain prompt "
        f"{first.plain_prompt!r}; set config.data.placeholder and config.data.class_word."
    )


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Creates the workdir and writes its config, or refuses a resume with a changed config."""
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = sorted(_diff_keys(previous, current))
        if changed:
            raise ConfigChangedError(
                f"{workdir} was started with another config; changed: {', '.join(changed)}. "
                "Resume with the same config, or use a new --workdir."
            )
        return
    io_utils.write_json(saved, current)


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _diff_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            keys.append(f"{prefix}{key} ({left!r} -> {right!r})")
    return keys


def load_sd(config: ml_collections.ConfigDict, path: Path):
    """Returns (sd, params) of the SD folder at `path` with the config's param and compute dtypes."""
    return models.load_stable_diffusion(
        path, param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype
    )


def build_runtime(config: ml_collections.ConfigDict, workdir: Path) -> Runtime:
    """Returns models, mesh and compiled functions for a run (built once, reused every round)."""
    paths = tiny.resolve_paths(config)
    concept = load_concept(config, paths["concept"], paths["class"])
    sd, sd_params = load_sd(config, paths["sd"])
    clip, clip_params = models.load_clip(paths["clip"])
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    return Runtime(
        config=config,
        workdir=workdir,
        concept=concept,
        sd=sd,
        sd_params=sd_params,
        trainer=trainer.Trainer(config, sd, mesh),
        generator=sample.Generator.from_config(config, sd, mesh),
        scorer=score.Scorer(clip, clip_params, mesh, batch_size=config.gal.score_batch),
        eval_concepts=_eval_concepts(config, paths),
    )


def _eval_concepts(config, paths) -> tuple:
    """Returns the concepts evaluated after each round (the tiny list when none is configured)."""
    if not config.eval.enabled:
        return ()
    concepts_json = config.eval.concepts_json or paths.get("concepts_json")
    if not concepts_json:
        raise ValueError("config.eval.enabled needs config.eval.concepts_json (the authors' concepts list)")
    return tuple(evaluate.read_concepts_list(Path(concepts_json)))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Runs (or resumes) GAL in `workdir`; returns the path of the HTML report."""
    check_config(config)
    workdir = Path(workdir)
    prepare_workdir(config, workdir)
    io_utils.sync("prepare_workdir")
    io_utils.enable_compilation_cache()
    runtime = build_runtime(config, workdir)
    records = read_records(workdir)
    rounds = 1 if config.gal.feedback == "none" else config.gal.rounds
    for round_index in range(1, rounds + 1):
        if round_index <= len(records):
            if records[-1]["stopped"]:
                break
            continue
        try:
            record = run_round(runtime, round_index, rounds, records)
        except AwaitingHumanFeedback as waiting:
            print(waiting)
            return _write_report(workdir, records)
        records.append(record)
        _write_report(workdir, records)
        if record["stopped"]:
            print(f"Round {round_index}: nothing left worth querying; stopping early.")
            break
    if records:
        final = round_dir(workdir, records[-1]["round"]) / "checkpoints"
        print(f"Final model: the last checkpoint in {final}")
    return _write_report(workdir, records)


def _write_report(workdir: Path, records: list[dict]) -> Path:
    """Returns the report's path, (re)writing it in the primary process."""
    if io_utils.is_primary():
        return report.write_report(workdir, records, evaluate.read_round_results(workdir) or None)
    return workdir / "report.html"


def read_records(workdir: Path) -> list[dict]:
    """Returns the records of the finished rounds, in order (stops at the first missing one)."""
    records = []
    while (file := round_dir(workdir, len(records) + 1) / "record.json").exists():
        records.append(io_utils.read_json(file))
    return records


def round_dir(workdir: Path, round_index: int) -> Path:
    return workdir / "rounds" / str(round_index)


def current_references(concept: Concept, records: Sequence[dict], workdir: Path) -> list[data.Reference]:
    """Returns the references of the next round: the last round's plus what it selected."""
    if not records:
        return list(concept.references)
    last = records[-1]
    entries = last["references"] + [
        {**s, "source": f"round-{last['round']}"} for s in last["selected"]
    ]
    return [
        data.Reference(
            image=io_utils.resolve(workdir, e["image"]),
            prompt=e["prompt"],
            plain_prompt=e.get("plain_prompt"),
            weight=float(e["weight"]),
            source=e["source"],
        )
        for e in entries
    ]


def remaining_pool(concept: Concept, records: Sequence[dict]) -> list[int]:
    """Returns the prompt_ids still in the pool: the original pool minus every chosen prompt."""
    chosen = {s["prompt_id"] for record in records for s in record["selected"]}
    return [i for i in range(len(concept.anchor_prompts)) if i not in chosen]


def run_round(runtime: Runtime, round_index: int, rounds: int, records: list[dict]) -> dict:
    """Runs the unfinished steps of one round and returns its record (also written to disk)."""
    config, workdir, concept = runtime.config, runtime.workdir, runtime.concept
    directory = round_dir(workdir, round_index)
    directory.mkdir(parents=True, exist_ok=True)
    references = current_references(concept, records, workdir)
    timings: dict[str, float] = {}

    with _timed(timings, "train"):
        unet_params = train_round(runtime, references, directory)
    if runtime.eval_concepts:
        with _timed(timings, "evaluate"):
            evaluate_round(runtime, round_index, unet_params, directory)
    record = _record_header(config, round_index, concept, references, workdir)
    pool = remaining_pool(concept, records)
    last_round = round_index == rounds or config.gal.feedback == "none"
    if last_round or len(pool) < config.gal.k:
        record.update(directions=[], openness=0.0, selected=[], stopped=not last_round)
    else:
        record.update(query_round(runtime, round_index, unet_params, pool, directory, timings))
    with _timed(timings, "write"):
        record["timings"] = timings
        io_utils.write_json(directory / "record.json", record)
    io_utils.sync(f"record {directory}")
    print(_timing_line(round_index, timings))
    return record


def train_round(runtime: Runtime, references: list[data.Reference], directory: Path):
    """Returns the UNet params trained from base on `references` (resumes from checkpoints)."""
    concept = runtime.concept
    train_set = directory / "train_set"
    if not (directory / "train_set.done").exists():
        if io_utils.is_primary():
            data.write_training_set(
                references,
                list(concept.class_images),
                concept.class_prompt,
                train_set,
                runtime.sd.tokenize,
                runtime.config.data.resolution,
            )
        io_utils.touch(directory / "train_set.done")
    io_utils.sync(f"train_set {directory}")
    unet_params, _ = runtime.trainer.train_round(runtime.sd_params, train_set, directory / "checkpoints")
    return unet_params


def evaluate_round(runtime: Runtime, round_index: int, unet_params, directory: Path) -> list[dict]:
    """Returns TXT-ALN / IMG-ALN / OVF of this round's model per concept (cached in eval.json)."""
    done = directory / "eval.json"
    if done.exists():
        return io_utils.read_json(done)
    params = dataclasses.replace(runtime.sd_params, unet=unet_params)
    results = [
        {"round": round_index, **evaluate.evaluate_model(
            runtime.generator, runtime.scorer, params, concept,
            # A concepts list without reference images is scored against the run's own originals.
            None if concept.reference_images else [r.image for r in runtime.concept.references],
            num_per_prompt=runtime.config.eval.num_per_prompt, seed=runtime.config.sample.seed,
            txt_scale=runtime.config.eval.txt_scale,
        )}
        for concept in runtime.eval_concepts
    ]
    io_utils.write_json(done, results)
    return results


def query_round(runtime, round_index, unet_params, pool, directory, timings) -> dict:
    """Returns the record fields of a query step: directions, openness, selected, stopped."""
    config, concept = runtime.config, runtime.concept
    prompts = [concept.anchor_prompts[i] for i in pool]
    images, index = generate_images(runtime, round_index, unet_params, pool, directory, timings)
    with _timed(timings, "score"):
        sims = score_images(runtime, images, prompts, directory)
    num = config.sample.num_per_prompt
    sim_anchor = np.asarray(sims["sim_anchor"]).reshape(len(pool), num)
    sim_plain = np.asarray(sims["sim_plain"]).reshape(len(pool), num, -1)
    scores = acquisition.score_directions(sim_anchor, sim_plain)
    directions = _direction_entries(pool, prompts, index, sim_anchor, sim_plain, scores)
    selection = choose(runtime, round_index, scores, directions, directory)
    return {
        "directions": directions,
        "openness": selection.openness,
        "selected": [
            {
                "prompt_id": directions[d]["prompt_id"],
                "prompt": directions[d]["prompt"],
                "image": directions[d]["images"][i]["path"],
                "weight": selection.weight,
            }
            for d, i in zip(selection.directions, selection.images)
        ],
        "stopped": selection.stopped,
    }


def choose(runtime, round_index, scores, directions, directory) -> acquisition.Selection:
    """Returns the round's selection under the configured feedback mode."""
    gal = runtime.config.gal
    if gal.feedback == "uncertainty":
        return acquisition.select_queries(scores, gal.k, gal.openness_lambda, gal.balance)
    openness = acquisition.openness(scores.entropies, gal.openness_lambda)
    weight = acquisition.new_reference_weight(openness, gal.balance)
    if gal.feedback == "random":
        # Random directions, each with its best image: only the choice of directions differs from
        # uncertainty sampling. All directions are scored so openness (and with balance the new
        # weight) is measured as in uncertainty mode, not forced to 0 as in the authors' code.
        chosen = acquisition.random_directions(len(directions), gal.k, gal.seed, round_index)
        images = [int(scores.best_images[d]) for d in chosen]
        return acquisition.Selection(tuple(chosen), tuple(images), weight, openness, stopped=False)
    return human_selection(runtime, round_index, directions, directory, weight, openness)


def human_selection(runtime, round_index, directions, directory, weight, openness) -> acquisition.Selection:
    """Returns the person's picks from selections.json, or raises AwaitingHumanFeedback."""
    record_like = {"round": round_index, "directions": directions}
    selections_file = directory / "selections.json"
    if not selections_file.exists():
        page = review.write_review_page(runtime.workdir, record_like, runtime.config.gal.k)
        raise AwaitingHumanFeedback(
            f"Round {round_index} waits for human feedback: open {page} (or run `gal-jax review "
            f"--workdir={runtime.workdir} --round={round_index}`), pick directions and images, save "
            f"{selections_file}, then rerun the same command."
        )
    picks = review.read_selections(selections_file, record_like)
    if not picks:  # the person found nothing worth querying: this round's model is the final one
        return acquisition.Selection((), (), weight, openness, stopped=True)
    by_id = {d["prompt_id"]: i for i, d in enumerate(directions)}
    chosen = [by_id[p["prompt_id"]] for p in picks]
    images = [
        [img["path"] for img in directions[d]["images"]].index(p["image"]) for d, p in zip(chosen, picks)
    ]
    return acquisition.Selection(tuple(chosen), tuple(images), weight, openness, stopped=False)


def generate_images(runtime, round_index, unet_params, pool, directory, timings):
    """Returns the round's images (P*N uint8) and their index; reads them back if already written."""
    done = directory / "generated.json"
    if done.exists():
        index = io_utils.read_json(done)
        return io_utils.read_images([io_utils.resolve(runtime.workdir, e["path"]) for e in index]), index
    concept, config = runtime.concept, runtime.config
    params = dataclasses.replace(runtime.sd_params, unet=unet_params)
    prompts = [concept.anchor_prompts[i] for i in pool]
    with _timed(timings, "generate"):
        images = runtime.generator.generate(
            params, prompts, pool, round_index, config.sample.num_per_prompt, config.sample.seed
        )
        images.block_until_ready()
    with _timed(timings, "write"):
        _write_generated(runtime, images, pool, directory, done)
    io_utils.sync(f"generated {directory}")
    return images, io_utils.read_json(done)


def _write_generated(runtime, images, pool, directory, done) -> None:
    """Writes the round's PNGs and then generated.json, the marker that generation is finished."""
    concept, config = runtime.concept, runtime.config
    host = sample.to_host(images, config.sample.num_per_prompt).reshape(-1, *images.shape[1:])
    index = []
    for n, (prompt_id, seed) in enumerate(_grid(pool, config.sample.num_per_prompt)):
        path = directory / "images" / f"p{prompt_id:03d}_s{seed:02d}.png"
        io_utils.write_png(path, host[n])
        index.append({"prompt_id": prompt_id, "prompt": concept.anchor_prompts[prompt_id],
                      "seed": seed, "path": str(path.relative_to(runtime.workdir))})
    io_utils.write_json(done, index)


def _grid(pool: Sequence[int], num: int) -> list[tuple[int, int]]:
    return [(prompt_id, seed) for prompt_id in pool for seed in range(num)]


def score_images(runtime, images, prompts, directory) -> dict:
    """Returns {'sim_anchor': (P*N,), 'sim_plain': (P*N, J)} for the round's images (cached on disk)."""
    done = directory / "scores.json"
    if done.exists():
        return io_utils.read_json(done)
    num = runtime.config.sample.num_per_prompt
    anchor_of_image = np.repeat(np.arange(len(prompts)), num)
    sim_anchor, sim_plain = runtime.scorer.similarities(
        images, anchor_of_image, prompts, list(runtime.concept.plain_prompts)
    )
    sims = {"sim_anchor": np.asarray(sim_anchor).tolist(), "sim_plain": np.asarray(sim_plain).tolist()}
    io_utils.write_json(done, sims)
    return sims


def _direction_entries(pool, prompts, index, sim_anchor, sim_plain, scores) -> list[dict]:
    num = sim_anchor.shape[1]
    return [
        {
            "prompt_id": prompt_id,
            "prompt": prompts[d],
            "overfit_rate": float(scores.rates[d]),
            "entropy": float(scores.entropies[d]),
            "images": [
                {
                    "path": index[d * num + n]["path"],
                    "seed": index[d * num + n]["seed"],
                    "sim_anchor": float(sim_anchor[d, n]),
                    "sim_plain": [float(s) for s in sim_plain[d, n]],
                    "overfit": bool(scores.flags[d, n]),
                }
                for n in range(num)
            ],
        }
        for d, prompt_id in enumerate(pool)
    ]


def _record_header(config, round_index, concept, references, workdir) -> dict:
    return {
        "round": round_index,
        "feedback": config.gal.feedback,
        "balance": bool(config.gal.balance),
        "lambda": float(config.gal.openness_lambda),
        "k": int(config.gal.k),
        "concept_phrase": concept.phrase,
        "plain_prompts": list(concept.plain_prompts),
        "references": [
            {
                "image": io_utils.relative_if_inside(workdir, r.image),
                "prompt": r.prompt,
                "plain_prompt": r.plain_prompt,
                "weight": r.weight,
                "source": r.source,
            }
            for r in references
        ],
    }


class _timed:
    """Adds the wall time of a `with` block to timings[name]."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def _timing_line(round_index: int, timings: dict) -> str:
    parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
    return f"Round {round_index} done in {sum(timings.values()):.1f}s ({parts})"


def sample_command(config, prompts_file: Path, num_per_prompt: int, out: Path) -> Path:
    """Generates `num_per_prompt` images for every prompt of a file with the base model; returns out."""
    prompts = [line.strip() for line in io_utils.read_text(prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{prompts_file}: no prompts (one prompt a line)")
    paths = tiny.resolve_paths(config)
    sd, params = load_sd(config, paths["sd"])
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    sample.sample_to_dir(config, sd, params, prompts, num_per_prompt, out, mesh=mesh)
    return out
