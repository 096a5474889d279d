"""The GAL loop on the host: train -> generate -> score -> query -> reweight, resumable.

Each round r leaves its work under `DIR/rounds/<r>/` (layout: `workdir.py`), one file per finished
step, so a rerun of the same command continues where the last one stopped and never redoes
finished work: the training set, the round's UNet (training states are deleted once it is written),
the generated images and their index, the CLIP scores, and the round's record, written last. After
the final round, `DIR/model/` holds the result as a diffusers Stable Diffusion folder.

Every file is written atomically, the workdir is locked while a run uses it, and a resume is refused
when the config or an input file changed. The math lives in `acquisition.py`; this module only
sequences steps and moves files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import ml_collections
from jax.sharding import Mesh
import numpy as np

from gal_jax import (
    acquisition, cpu_devices, data, eval_results, evaluate, export, faults, inputs, io_utils, models, multi_subject,
    personalize, report, review, sample, schedulers, score, sharding, tiny_world_oracle, trainer,
)
from gal_jax.concept import Concept, identity_check, load_concept
from gal_jax import workdir as workdir_lib
from gal_jax.records import (NO_IDENTITY_CHECK, Direction, ImageScore, LossPoint, ReferenceEntry, RoundRecord,
                             SelectedEntry)
from gal_jax.workdir import AwaitingHumanFeedback, RoundPaths, Workdir, WorkdirError

FEEDBACK_MODES = ("uncertainty", "random", "human", "none")
IDENTITY_CHECKS = (NO_IDENTITY_CHECK, "clip")  # config.gal.identity_check of multi-subject runs


class ConfigChangedError(ValueError):
    """A workdir is resumed with a config that differs from the one it was started with."""


@dataclasses.dataclass
class Runtime:
    """Everything built once per run and reused by every round (models, compiled functions)."""

    config: ml_collections.ConfigDict
    workdir: Workdir
    paths: inputs.RunPaths
    concept: Concept
    sd: Any  # with the method's new tokens, when it adds some
    sd_params: Any  # the base weights (the text encoder's table without the new rows)
    method: personalize.Method
    trainer: Any
    generator: Any
    scorer: Any  # CLIP: the evaluation's, and the overfit oracle's unless config.gal.oracle says otherwise
    eval_concepts: tuple = ()  # evaluate.EvalConcept, when config.eval.enabled
    eval_generator: Any = None  # config.eval's sampler, steps and guidance, when config.eval.enabled
    oracle: Any = None  # scores the rounds' pictures (GAL_SPEC step 3); None: the CLIP scorer

    @property
    def overfit_scorer(self):
        return self.scorer if self.oracle is None else self.oracle


# ---------------------------------------------------------------------------------------------
# Set-up: config, workdir and inputs are checked before any model is loaded
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
    # The method, its stages' trainable regexes, and every stage's train settings.
    trainer.check_stages(personalize.stages_from_config(config),
                         adds_token=personalize.method_name(config) in personalize.NEW_TOKEN_METHODS)
    personalize.lora_from_config(config)
    check_sampling(config.sample, "sample")
    if config.sample.num_per_prompt < 1:
        raise ValueError(f"config.sample.num_per_prompt={config.sample.num_per_prompt} must be >= 1")
    sample.check_chunk_bound(config.sample.max_images_per_device, "config.sample.")
    if config.gal.score_batch < 1:
        raise ValueError(f"config.gal.score_batch={config.gal.score_batch} must be >= 1")
    for field, value in (("train.save_dtype", config.train.save_dtype), ("export.dtype", config.export.dtype)):
        if value not in export.DTYPES:
            raise ValueError(f"config.{field}={value!r}; expected one of {tuple(export.DTYPES)}")
    _check_query_and_eval_options(config)
    cpu_devices.check_count(config.mesh.get("cpu_devices", 0))
    mesh = sharding.mesh_from_config(config.mesh)  # sizes that do not cover the devices
    sharding.train_mesh_from_config(config.mesh, mesh)
    sharding.logical_rules(config.mesh.rules)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Workdir) -> None:
    """Writes the workdir's config, or refuses a resume with a changed config."""
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    if workdir.config.exists():
        previous = _read_json_or_damaged(workdir.config)
        changed = workdir_lib.config_changes(previous, current)
        if changed:
            raise ConfigChangedError(
                f"{workdir.root} was started with another config; changed: {', '.join(changed)}. "
                "Resume with the same config, or use a new --workdir."
            )
        return
    io_utils.write_json(workdir.config, current)


def _read_json_or_damaged(path: Path) -> Any:
    try:
        return io_utils.read_json(path)
    except ValueError as err:
        raise WorkdirError(f"{err}; the workdir is damaged (restore the file, or use a new --workdir)") from None


def check_inputs(config, workdir: Workdir, paths: inputs.RunPaths, concept: Concept) -> None:
    """Records the input files' fingerprints, or refuses a resume in which one changed."""
    extra = [Path(config.eval.concepts_json)] if config.eval.enabled and config.eval.concepts_json else []
    extra += [r.mask for r in concept.references if r.mask is not None]
    if concept.prior is not None:  # a masked prior set: its captions and masks decide the records too
        extra += [concept.prior.file] + [image.mask for image in concept.prior.images]
    files = inputs.input_files(paths, [r.image for r in concept.references], concept.class_images,
                               concept.anchor_file, extra, concept_file=concept.concept_file)
    current = inputs.fingerprints(files)
    if workdir.inputs.exists():
        inputs.check_fingerprints(_read_json_or_damaged(workdir.inputs), current, workdir.inputs)
    else:
        io_utils.write_json(workdir.inputs, current)


def load_sd(config: ml_collections.ConfigDict, path: Path, mesh: Mesh | None = None):
    """Returns (sd, params) of the SD folder at `path` with the config's param and compute dtypes
    and attention implementation; with a `mesh`, each weight read straight onto the sharding the
    trainer gives it (config.mesh.rules)."""
    return models.load_stable_diffusion(
        path, param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
        attention=config.model.attention, mesh=mesh, rules=sharding.logical_rules(config.mesh.rules),
        allow_bin=config.model.get("allow_bin", False),
    )


def load_clip(config: ml_collections.ConfigDict, path: Path, mesh: Mesh | None = None):
    """Returns (clip, params) of the CLIP folder at `path` with the config's attention; with a
    `mesh`, read straight onto every device (scoring is data parallel: no rules, replicated)."""
    return models.load_clip(path, attention=config.model.attention, mesh=mesh, rules=(),
                            allow_bin=config.model.get("allow_bin", False))


def build_runtime(config, workdir: Workdir, paths: inputs.RunPaths, concept: Concept) -> Runtime:
    """Returns models, mesh and compiled functions for a run (built once, reused every round)."""
    mesh = sharding.mesh_from_config(config.mesh)
    sd, sd_params = load_sd(config, paths.sd, mesh)
    sd, method = personalize.prepare(config, sd, placeholder=concept.placeholder, class_word=concept.class_word)
    clip, clip_params = load_clip(config, paths.clip, mesh)
    eval_concepts = _eval_concepts(config, paths)
    return Runtime(
        config=config,
        workdir=workdir,
        paths=paths,
        concept=concept,
        sd=sd,
        sd_params=sd_params,
        method=method,
        trainer=trainer.Trainer(config, sd, sharding.train_mesh_from_config(config.mesh, mesh), method),
        generator=sample.Generator.from_config(config, sd, mesh),
        scorer=score.Scorer(clip, clip_params, mesh, batch_size=config.gal.score_batch),
        oracle=tiny_world_oracle.JudgeScorer() if tiny_world_oracle.configured(config) == "tiny_world_judge" else None,
        eval_concepts=eval_concepts,
        # The evaluation protocol (the authors' notebook: PNDM, 50 steps) differs from the loop's sampler.
        eval_generator=sample.Generator.from_config(config, sd, mesh, section="eval") if eval_concepts else None,
    )


def _check_query_and_eval_options(config) -> None:
    """Raises ValueError naming config.gal.random_image or a config.eval field that cannot work."""
    if config.gal.random_image not in acquisition.RANDOM_IMAGE_RULES:
        raise ValueError(f"config.gal.random_image={config.gal.random_image!r}; "
                         f"expected one of {acquisition.RANDOM_IMAGE_RULES}")
    if identity_check(config) not in IDENTITY_CHECKS:
        raise ValueError(f"config.gal.identity_check={identity_check(config)!r}; expected one of {IDENTITY_CHECKS}")
    oracle = tiny_world_oracle.configured(config)
    if oracle not in tiny_world_oracle.ORACLES:
        raise ValueError(f"config.gal.oracle={oracle!r}; expected one of {tiny_world_oracle.ORACLES}")
    if oracle == "tiny_world_judge" and not config.model.get("tiny_world", False):
        raise ValueError("config.gal.oracle=tiny_world_judge judges pictures of the tiny world only: "
                         "set config.model.tiny_world=true (configs/tiny_world.py)")
    if oracle == "tiny_world_judge" and identity_check(config) != "none":
        raise ValueError("config.gal.oracle=tiny_world_judge cannot check identities: "
                         "set config.gal.identity_check=none")
    if config.eval.enabled:
        check_sampling(config.eval, "eval")
        if config.eval.num_per_prompt < 1:
            raise ValueError(f"config.eval.num_per_prompt={config.eval.num_per_prompt} must be >= 1")


def check_sampling(settings, section: str) -> None:
    """Raises ValueError naming config.<section>'s sampler, steps or guidance when it cannot work."""
    if settings.sampler not in schedulers.SAMPLERS:
        raise ValueError(f"config.{section}.sampler={settings.sampler!r}; expected one of {schedulers.SAMPLERS}")
    if isinstance(settings.steps, bool) or not isinstance(settings.steps, int) or settings.steps < 1:
        raise ValueError(f"config.{section}.steps={settings.steps!r} must be a positive integer")
    sample.check_guidance(settings.guidance_scale, f"config.{section}.")


def _eval_concepts(config, paths: inputs.RunPaths) -> tuple:
    """Returns the concepts evaluated after each round (the tiny list when none is configured)."""
    if not config.eval.enabled:
        return ()
    concepts_json = config.eval.concepts_json or paths.concepts_json
    if not concepts_json:
        raise ValueError("config.eval.enabled needs config.eval.concepts_json (the authors' concepts list)")
    return tuple(evaluate.read_concepts_list(Path(concepts_json)))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def total_rounds(config) -> int:
    return 1 if config.gal.feedback == "none" else config.gal.rounds


def is_finished(records: Sequence[RoundRecord], rounds: int) -> bool:
    """Returns True when no round is left: the last one ran, or the stop rule fired."""
    return bool(records) and (records[-1].stopped or records[-1].round >= rounds)


def run(config: ml_collections.ConfigDict, workdir: Path | str) -> Path:
    """Runs (or resumes) GAL in `workdir`; returns the path of the HTML report.

    Raises AwaitingHumanFeedback when a round waits for a person's picks (human feedback).
    """
    check_config(config)
    workdir = Workdir(workdir)
    if io_utils.is_primary():
        workdir.check_usable(create=True)
    io_utils.sync("check_workdir")
    # Process 0 alone locks: the others follow it through barriers.
    lock = workdir.lock() if io_utils.is_primary() else contextlib.nullcontext()
    with lock:
        return _run_locked(config, workdir)


def _run_locked(config, workdir: Workdir) -> Path:
    if io_utils.is_primary():
        workdir.remove_stale_temporaries()
    prepare_workdir(config, workdir)
    io_utils.sync("prepare_workdir")
    paths = inputs.resolve(config)
    concepts_json = Path(config.eval.concepts_json) if config.eval.concepts_json else paths.concepts_json
    concept = load_concept(config, paths.concept, paths.class_dir, concepts_json)
    if io_utils.is_primary():
        check_inputs(config, workdir, paths, concept)
    io_utils.sync("check_inputs")
    records = workdir.read_records()
    rounds = total_rounds(config)
    status = workdir.read_status()
    if is_finished(records, rounds) and status.get("status") == "complete":
        print(workdir.complete_message(status))
        return workdir.report_html
    io_utils.enable_compilation_cache()
    runtime = build_runtime(config, workdir, paths, concept)
    while not is_finished(records, rounds):
        try:
            record = run_round(runtime, len(records) + 1, rounds, records)
        except AwaitingHumanFeedback:
            _write_report(workdir, records, review_page=workdir.round(len(records) + 1).review_html)
            raise
        records.append(record)
        _write_report(workdir, records)
        if record.stopped:
            print(f"Round {record.round}: nothing left worth querying; stopping early.")
    export_final_model(runtime, records[-1].round)
    report_path = _write_report(workdir, records, model_dir=workdir.model_dir)
    if io_utils.is_primary():
        workdir.write_status({"status": "complete", "final_round": records[-1].round,
                              "model": workdir.relative(workdir.model_dir),
                              "report": workdir.relative(report_path)})
    print(f"Final model (round {records[-1].round}): {workdir.model_dir}")
    return report_path


def _write_report(workdir: Workdir, records: list[RoundRecord], **links: Path) -> Path:
    """Returns the report's path, (re)writing it in the primary process (`links`: model_dir once
    the model is exported, review_page while the run waits for human feedback)."""
    faults.maybe_kill("phase", "report")
    if io_utils.is_primary():
        evaluations = eval_results.read_round_results(workdir.root) or None
        return report.write_report(workdir.root, records, evaluations, **links)
    return workdir.report_html


def read_records(workdir: Path | str) -> list[RoundRecord]:
    """Returns the records of the finished rounds of `workdir`, in order."""
    return Workdir(workdir).read_records()


def current_references(concept: Concept, records: Sequence[RoundRecord], workdir: Workdir) -> list[data.Reference]:
    """Returns the references of the next round: the last round's plus what it selected."""
    if not records:
        return list(concept.references)
    last = records[-1]
    entries = [(e.image, e.prompt, e.plain_prompt, e.weight, e.source) for e in last.references]
    entries += [(s.image, s.prompt, None, s.weight, f"round-{last.round}") for s in last.selected]
    # A multi-subject concept's own images keep their masks and subjects (the records hold neither).
    segmented = {(Path(r.image).absolute(), r.prompt): r for r in concept.references if r.mask is not None}
    references = []
    for image, prompt, plain, weight, source in entries:
        path = workdir.resolve(image)
        original = segmented.get((Path(path).absolute(), prompt)) if source == "user" else None
        references.append(data.Reference(
            image=path, prompt=prompt, plain_prompt=plain, weight=float(weight), source=source,
            mask=original.mask if original else None, subject=original.subject if original else ""))
    return references


def remaining_pool(concept: Concept, records: Sequence[RoundRecord]) -> list[int]:
    """Returns the prompt_ids still in the pool: the original pool minus every chosen prompt."""
    chosen = {s.prompt_id for record in records for s in record.selected}
    return [i for i in range(len(concept.anchor_prompts)) if i not in chosen]


def run_round(runtime: Runtime, round_index: int, rounds: int, records: list[RoundRecord]) -> RoundRecord:
    """Runs the unfinished steps of one round and returns its record (also written to disk)."""
    config, workdir, concept = runtime.config, runtime.workdir, runtime.concept
    paths = workdir.round(round_index)
    paths.dir.mkdir(parents=True, exist_ok=True)
    references = current_references(concept, records, workdir)
    timings: dict[str, float] = {}
    built_before = len(io_utils.executables_built())

    with io_utils.timed(timings, "train"):
        result, train_loss = train_round(runtime, references, paths)
        params = result.apply(runtime.sd_params)  # LoRA merged, new tokens in the table
    if runtime.eval_concepts:
        with io_utils.timed(timings, "evaluate"):
            evaluate_round(runtime, round_index, params, paths)
    pool = remaining_pool(concept, records)
    if round_index == rounds or len(pool) < config.gal.k:
        query = dict(directions=(), openness=0.0, selected=(), stopped=round_index != rounds)
    else:
        query = query_round(runtime, round_index, params, pool, paths, timings)
    record = RoundRecord(
        round=round_index,
        feedback=config.gal.feedback,
        balance=bool(config.gal.balance),
        openness_lambda=float(config.gal.openness_lambda),
        k=int(config.gal.k),
        concept_phrase=concept.phrase,
        plain_prompts=concept.plain_prompts,
        references=tuple(
            ReferenceEntry(image=workdir.relative(r.image), prompt=r.prompt, plain_prompt=r.plain_prompt,
                           weight=r.weight, source=r.source)
            for r in references
        ),
        timings=dict(timings),
        train_loss=tuple(LossPoint(step=int(p["step"]), loss=float(p["loss"])) for p in train_loss),
        **selection_rules(config.gal),
        **identity_fields(config, concept),
        **query,
    )
    workdir.write_record(record)
    io_utils.sync(f"record {paths.dir}")
    print(_timing_line(round_index, timings, len(io_utils.executables_built()) - built_before))
    return record


def train_round(runtime: Runtime, references: list[data.Reference], paths: RoundPaths):
    """Returns (the round's personalize.Personalization, its loss curve): read from its result
    folder (`unet/` for DreamBooth, else `personalization/`) and train_loss.json when the round
    trained already, else trained from base on `references` (resuming from checkpoints) and
    saved there."""
    config = runtime.config
    result_dir = paths.result(runtime.method.name)
    if result_dir.is_dir():  # renamed into place when complete: its presence means finished
        curve = _read_json_or_damaged(paths.train_loss) if paths.train_loss.is_file() else []
        return load_round_result(runtime, result_dir), curve
    concept = runtime.concept
    if not paths.train_set_done.exists():
        if io_utils.is_primary():
            data.write_training_set(references, list(concept.class_images), concept.class_prompt,
                                    paths.train_set, runtime.sd.tokenize, config.data.resolution,
                                    subjects=concept.subjects or None, prior=concept.prior)
        io_utils.touch(paths.train_set_done)
    io_utils.sync(f"train_set {paths.dir}")
    # Without keep_training_state the checkpoints are deleted once the result is written: a final
    # one would be written only to be deleted (~10 GB for SD 1.5).
    result, metrics = runtime.trainer.train_round(
        runtime.sd_params, paths.train_set, paths.checkpoints, desc=f"round {paths.index} train",
        final_checkpoint=bool(config.train.keep_training_state))
    curve = [{"step": p["step"], "loss": p["loss"]} for p in metrics["loss_curve"]]
    if result.unet is not None and config.train.save_dtype != config.model.param_dtype:
        # Continue with exactly what the file holds, so a resumed round generates the same images.
        unet = models.cast_params(models.cast_params(result.unet, config.train.save_dtype), config.model.param_dtype)
        result = dataclasses.replace(result, unet=unet)
    host_result = sharding.gather_to_host(result)
    method = runtime.method
    if io_utils.is_primary():
        io_utils.write_json(paths.train_loss, curve)
        if method.name == "dreambooth":
            export.save_unet(runtime.sd, host_result.unet, paths.unet, dtype=config.train.save_dtype)
        else:
            tokens = method.new_tokens.tokens if method.new_tokens else ()
            export.save_personalization(runtime.sd, host_result, tokens, paths.personalization,
                                        dtype=config.train.save_dtype)
        if not config.train.keep_training_state:
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
    io_utils.sync(f"result {paths.dir}")
    if method.name != "dreambooth":
        # LoRA files fold alpha / r into lora_B: continue with what they hold, as a resume would.
        result = load_round_result(runtime, paths.personalization)
    return result, curve


def load_round_result(runtime: Runtime, folder: Path) -> personalize.Personalization:
    """Returns the Personalization saved in a round's result folder."""
    dtype = runtime.config.model.param_dtype
    if runtime.method.name == "dreambooth":
        return personalize.Personalization(unet=export.load_unet(runtime.sd, folder, param_dtype=dtype))
    _, result = export.load_personalization(runtime.sd, folder, param_dtype=dtype)
    return result


def evaluate_round(runtime: Runtime, round_index: int, params, paths: RoundPaths) -> list[dict]:
    """Returns TXT-ALN / IMG-ALN / OVF of this round's model (`params`, all components) per
    concept (cached in eval.json)."""
    config = runtime.config
    if paths.eval.exists():
        cached = _read_json_or_damaged(paths.eval)
        _check_eval_cache(cached, runtime.eval_concepts, paths.eval)
        _check_eval_settings(cached, eval_settings(config), paths.eval)
        return cached
    results = [
        {"round": round_index, **evaluate.evaluate_model(
            runtime.eval_generator, runtime.scorer, params, concept,
            # A concepts list without reference images is scored against the run's own originals.
            None if concept.reference_images else [r.image for r in runtime.concept.references],
            num_per_prompt=config.eval.num_per_prompt, seed=config.eval.seed,
            txt_scale=config.eval.txt_scale, desc=f"round {round_index} evaluate {concept.name}",
        )}
        for concept in runtime.eval_concepts
    ]
    io_utils.write_json(paths.eval, results)
    return results


def eval_settings(config) -> dict:
    """Returns the evaluation protocol of config.eval as evaluate_model records it in its settings."""
    e = config.eval
    return {"txt_scale": float(e.txt_scale), "num_per_prompt": int(e.num_per_prompt), "seed": int(e.seed),
            "sampler": e.sampler, "steps": int(e.steps), "guidance_scale": float(e.guidance_scale)}


def _check_eval_settings(cached: list, expected: dict, path: Path) -> None:
    """Raises WorkdirError when a cached eval.json was made under another evaluation protocol."""
    for entry in cached:
        found = entry.get("settings")  # entries are dicts: _check_eval_cache ran first
        if found != expected:
            raise WorkdirError(f"{path}: evaluated with settings {found}, not this run's {expected}; "
                               "delete it to evaluate again")


def _check_eval_cache(cached: Any, concepts: Sequence, path: Path) -> None:
    """Raises WorkdirError when a cached eval.json does not hold this run's evaluation concepts."""
    expected = [(c.name, c.generation_prompts()) for c in concepts]
    try:
        found = [(entry["concept"], list(entry["generation_prompts"])) for entry in cached]
    except (TypeError, KeyError):
        found = None
    if found != expected:
        raise WorkdirError(
            f"{path}: does not hold the evaluation of this run's test prompts "
            f"({[name for name, _ in expected]}); delete it to evaluate again"
        )


def query_round(runtime, round_index, params, pool, paths: RoundPaths, timings) -> dict:
    """Returns the record fields of a query step: directions, openness, selected, stopped."""
    config, concept = runtime.config, runtime.concept
    prompts = [concept.anchor_prompts[i] for i in pool]
    images, index = generate_images(runtime, round_index, params, pool, paths, timings)
    with io_utils.timed(timings, "score"):
        sims = score_images(runtime, images, prompts, paths)
    num = config.sample.num_per_prompt
    sim_anchor = np.asarray(sims["sim_anchor"]).reshape(len(pool), num)
    sim_plain = np.asarray(sims["sim_plain"]).reshape(len(pool), num, -1)
    sim_subjects = None
    if "sim_subjects" in sims:
        sim_subjects = np.asarray(sims["sim_subjects"]).reshape(len(pool), num, len(concept.subjects), -1)
    scores = acquisition.score_directions(sim_anchor, sim_plain, sim_subjects)
    directions = _directions(pool, prompts, index, sim_anchor, sim_plain, scores, sim_subjects)
    selection = choose(runtime, round_index, scores, directions, paths)
    return {
        "directions": directions,
        "openness": selection.openness,
        "selected": tuple(
            SelectedEntry(prompt_id=directions[d].prompt_id, prompt=directions[d].prompt,
                          image=directions[d].images[i].path, weight=selection.weight)
            for d, i in zip(selection.directions, selection.images)
        ),
        "stopped": selection.stopped,
    }


def choose(runtime, round_index, scores, directions, paths: RoundPaths) -> acquisition.Selection:
    """Returns the round's selection under the configured feedback mode."""
    gal = runtime.config.gal
    if gal.feedback == "uncertainty":
        return acquisition.select_queries(scores, gal.k, gal.openness_lambda, gal.balance)
    if gal.feedback == "random":
        # All directions are scored, so openness (and with balance the new weight) is measured as
        # in uncertainty mode, not forced to 0 as in the authors' code (one image per direction).
        return acquisition.select_random(scores, [d.prompt_id for d in directions], gal.k, gal.openness_lambda,
                                         gal.balance, gal.seed, round_index, image=gal.random_image)
    openness = acquisition.openness(scores.entropies, gal.openness_lambda)
    weight = acquisition.new_reference_weight(openness, gal.balance)
    return human_selection(runtime, round_index, directions, paths, weight, openness)


def identity_fields(config, concept: Concept) -> dict:
    """Returns the record's identity_check and subjects (empty without the check)."""
    check = identity_check(config)
    return {"identity_check": check, "subjects": () if check == NO_IDENTITY_CHECK else tuple(concept.subjects)}


def selection_rules(gal) -> dict:
    """Returns the record's `tie_break` and `image_rule`: how the configured feedback ranks
    directions of equal entropy and picks a queried direction's image."""
    if gal.feedback == "human":
        image_rule = "the person's pick"
    elif gal.feedback == "random" and gal.random_image == "random":
        image_rule = acquisition.random_image_rule(gal.seed)
    else:
        image_rule = acquisition.BEST_IMAGE_RULE
    return {"tie_break": acquisition.TIE_BREAK, "image_rule": image_rule}


def human_selection(runtime, round_index, directions, paths: RoundPaths, weight, openness) -> acquisition.Selection:
    """Returns the person's picks from selections.json, or raises AwaitingHumanFeedback."""
    if not paths.selections.exists():
        page = review.write_review_page(runtime.workdir.root, round_index, directions, runtime.config.gal.k)
        if io_utils.is_primary():
            runtime.workdir.write_status({"status": "awaiting_feedback", "round": round_index,
                                          "review": runtime.workdir.relative(page)})
        raise AwaitingHumanFeedback(
            f"Round {round_index} waits for human feedback: open {page} (or run `gal-jax review "
            f"--workdir={runtime.workdir.root} --round={round_index}`), pick directions and images, save "
            f"{paths.selections}, then rerun the same command."
        )
    picks = review.read_selections(paths.selections, round_index, directions)
    if not picks:  # the person found nothing worth querying: this round's model is the final one
        return acquisition.Selection((), (), weight, openness, stopped=True)
    by_id = {d.prompt_id: i for i, d in enumerate(directions)}
    chosen = [by_id[p["prompt_id"]] for p in picks]
    images = [[img.path for img in directions[d].images].index(p["image"]) for d, p in zip(chosen, picks)]
    return acquisition.Selection(tuple(chosen), tuple(images), weight, openness, stopped=False)


def _grid(pool: Sequence[int], num: int) -> list[tuple[int, int]]:
    return [(prompt_id, seed) for prompt_id in pool for seed in range(num)]


def generate_images(runtime, round_index, params, pool, paths: RoundPaths, timings):
    """Returns the round's images (P*N uint8) of the round's model `params` and their index;
    reads them back if already written."""
    concept, config, workdir = runtime.concept, runtime.config, runtime.workdir
    expected = [{"prompt_id": pid, "prompt": concept.anchor_prompts[pid], "seed": seed,
                 "path": workdir.relative(paths.image(pid, seed))}
                for pid, seed in _grid(pool, config.sample.num_per_prompt)]
    if paths.generated.exists():
        index = _read_json_or_damaged(paths.generated)
        if index != expected:
            raise WorkdirError(
                f"{paths.generated}: does not index this round's grid ({len(pool)} prompts x "
                f"{config.sample.num_per_prompt} seeds of the remaining pool); delete it to generate again"
            )
        return io_utils.read_images([workdir.resolve(e["path"]) for e in index]), index
    prompts = [concept.anchor_prompts[i] for i in pool]
    files, writer = [workdir.resolve(entry["path"]) for entry in expected], io_utils.PngWriter()

    def write_chunk(rows: range, chunk) -> None:  # PNGs written on threads while the next chunk generates
        writer.submit(files[rows.start : rows.stop], sample.rows_to_host(chunk)[: len(rows)])

    with writer:
        with io_utils.timed(timings, "generate"):
            init = initial_collages(runtime, round_index, _grid(pool, config.sample.num_per_prompt))
            images = runtime.generator.generate(
                params, prompts, pool, round_index, config.sample.num_per_prompt, config.sample.seed,
                desc=f"round {round_index} generate", init_images=init,
                init_gamma=config.sample.get("init_gamma", 0.0), on_chunk=write_chunk,
            )
            images.block_until_ready()
        with io_utils.timed(timings, "write"):  # the writing that generation did not hide
            writer.wait()
            io_utils.write_json(paths.generated, expected)  # the marker that generation is finished
    io_utils.sync(f"generated {paths.dir}")
    return images, expected


def initial_collages(runtime, round_index: int, grid) -> np.ndarray | None:
    """Returns MuDI's initial image of every (prompt_id, seed) of the grid
    (`multi_subject.initial_images`), or None unless the concept has several subjects and
    config.sample.init_gamma > 0."""
    config, concept = runtime.config, runtime.concept
    if not (concept.subjects and config.sample.get("init_gamma", 0.0)):
        return None
    return multi_subject.initial_images(concept.references, list(concept.subjects), runtime.sd.resolution,
                                        config.sample.seed, round_index, grid)


def score_images(runtime, images, prompts, paths: RoundPaths) -> dict:
    """Returns {'sim_anchor': (P*N,), 'sim_plain': (P*N, J)} for the round's images, and with the
    identity check 'sim_subjects' (P*N, S, S) (cached on disk)."""
    num = runtime.config.sample.num_per_prompt
    plain = list(runtime.concept.plain_prompts)
    subjects = identity_fields(runtime.config, runtime.concept)["subjects"]
    if paths.scores.exists():
        sims = _read_json_or_damaged(paths.scores)
        _check_scores(sims, prompts, plain, num, paths.scores, len(subjects))
        return sims
    anchor_of_image = np.repeat(np.arange(len(prompts)), num)
    sim_anchor, sim_plain = runtime.overfit_scorer.similarities(images, anchor_of_image, prompts, plain)
    sims = {"prompts": list(prompts), "plain_prompts": plain,
            "sim_anchor": np.asarray(sim_anchor).tolist(), "sim_plain": np.asarray(sim_plain).tolist()}
    if subjects:
        portraits = multi_subject.subject_portraits(runtime.concept.references, subjects, images.shape[1])
        sims["sim_subjects"] = np.asarray(runtime.scorer.subject_similarities(images, portraits)).tolist()
    io_utils.write_json(paths.scores, sims)
    return sims


def _check_scores(sims: Any, prompts, plain, num: int, path: Path, subjects: int = 0) -> None:
    """Raises WorkdirError when cached scores are not those of these prompts' images (with the
    identity check over `subjects` subjects, with its similarities)."""
    problem = None
    if not isinstance(sims, dict) or not {"sim_anchor", "sim_plain"} <= set(sims):
        problem = "it lacks sim_anchor/sim_plain"
    elif sims.get("prompts", prompts) != list(prompts) or sims.get("plain_prompts", plain) != list(plain):
        problem = "it scores other prompts"
    elif np.shape(sims["sim_anchor"]) != (len(prompts) * num,) or np.shape(sims["sim_plain"]) != (
            len(prompts) * num, len(plain)):
        problem = f"its shapes do not match {len(prompts)} prompts x {num} images x {len(plain)} plain prompts"
    elif subjects and np.shape(sims.get("sim_subjects")) != (len(prompts) * num, subjects, subjects):
        problem = f"it lacks the identity check's sim_subjects ({len(prompts) * num} images x {subjects} x {subjects})"
    elif not subjects and "sim_subjects" in sims:
        problem = "it holds an identity check this run does not make"
    if problem:
        raise WorkdirError(f"{path}: {problem}; delete it to score again")


def _directions(pool, prompts, index, sim_anchor, sim_plain, scores, sim_subjects=None) -> tuple[Direction, ...]:
    num = sim_anchor.shape[1]

    def identity(d: int, n: int) -> dict:  # the identity check's fields of image (d, n), if it ran
        if sim_subjects is None:
            return {}
        return {"sim_subjects": tuple(tuple(float(v) for v in row) for row in sim_subjects[d, n]),
                "identity_mixed": bool(scores.mixed[d, n])}

    return tuple(
        Direction(
            prompt_id=prompt_id,
            prompt=prompts[d],
            overfit_rate=float(scores.rates[d]),
            entropy=float(scores.entropies[d]),
            images=tuple(
                ImageScore(path=index[d * num + n]["path"], seed=index[d * num + n]["seed"],
                           sim_anchor=float(sim_anchor[d, n]),
                           sim_plain=tuple(float(s) for s in sim_plain[d, n]),
                           overfit=bool(scores.overfit[d, n]), **identity(d, n))
                for n in range(num)
            ),
        )
        for d, prompt_id in enumerate(pool)
    )


def export_final_model(runtime: Runtime, round_index: int) -> Path:
    """Returns DIR/model after writing it from round `round_index`'s result (once; atomic): the
    base pipeline with the round's UNet, and its LoRA weights and learned embeddings beside."""
    workdir, config = runtime.workdir, runtime.config
    if not workdir.model_dir.is_dir():
        faults.maybe_kill("phase", "export")
        paths = workdir.round(round_index)
        result_dir = paths.result(runtime.method.name)
        if not result_dir.is_dir():  # a workdir of an earlier version: the UNet is in its checkpoint
            train_round(runtime, [], paths)
        if io_utils.is_primary():
            write_round_pipeline(runtime.paths.sd, result_dir, workdir.model_dir, config.export.dtype)
        io_utils.sync("export")
    return workdir.model_dir


def write_round_pipeline(base: Path, result_dir: Path, out: Path, dtype: str) -> Path:
    """Returns `out`, now the diffusers pipeline of a round's result folder: `unet/` (DreamBooth)
    or `personalization/` (its unet/ when trained, else the base's, and its LoRA weights and
    learned embeddings beside the components, where diffusers' loaders look)."""
    if result_dir.name != "personalization":
        return export.write_pipeline(base, result_dir, out, dtype=dtype)
    unet = result_dir / "unet" if (result_dir / "unet").is_dir() else Path(base) / "unet"
    return export.write_pipeline(base, unet, out, dtype=dtype, extra_files=export.personalization_files(result_dir))


def _timing_line(round_index: int, timings: dict, executables: int) -> str:
    parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items())
    # Executables compiled or loaded from the compilation cache: after round 1, only the few
    # small ones whose shapes follow the number of images (the grid shrinks as prompts are queried).
    return (f"Round {round_index} done in {sum(timings.values()):.1f}s ({parts}; "
            f"{executables} XLA executables built)")
