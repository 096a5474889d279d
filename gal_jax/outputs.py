"""What a run gives: each round's fine-tuned model, exported as a diffusers folder or sampled from.

    gal-jax export --workdir=DIR [--round=R] --out=FOLDER         # any finished round's model
    gal-jax sample --workdir=DIR [--round=R] --prompts=FILE       # images from a run's model
    gal-jax sample --config=CONFIG --prompts=FILE --out=FOLDER    # images from the base model

A run's model is the base Stable Diffusion of its config with the round's result: its UNet
(`DIR/rounds/<r>/unet/`, DreamBooth) or its personalization (`DIR/rounds/<r>/personalization/`:
LoRA weights, learned token embeddings, a UNet). The run's own config is read from
`DIR/config.json`, so these commands need no --config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from gal_jax import concept as concept_lib
from gal_jax import anchors, cpu_devices, driver, export, inputs, io_utils, multi_subject, personalize, sample, sharding
from gal_jax.workdir import Workdir, WorkdirError


def read_prompts(path: Path) -> list[str]:
    """Returns the prompts of a text file, one a line (blank lines skipped)."""
    prompts = [" ".join(line.split()) for line in io_utils.read_text(path).splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one prompt a line)")
    return prompts


def run_config(workdir: Workdir) -> ml_collections.ConfigDict:
    """Returns the config a run was started with (DIR/config.json)."""
    if not workdir.root.is_dir():
        raise WorkdirError(f"{workdir.root}: workdir does not exist")
    if not workdir.config.is_file():
        raise WorkdirError(f"{workdir.config}: missing; {workdir.root} is not a gal-jax workdir")
    try:
        return ml_collections.ConfigDict(io_utils.read_json(workdir.config))
    except ValueError as err:
        raise WorkdirError(f"{err}; the workdir is damaged") from None


def finished_round(workdir: Workdir, round_index: int | None, method: str = "dreambooth") -> int:
    """Returns `round_index` (default: the last finished round) after checking its result (of
    personalization `method`) exists."""
    records = workdir.read_records()
    if not records:
        raise WorkdirError(f"{workdir.root}: no finished round yet (no rounds/<r>/record.json)")
    finished = [r.round for r in records]
    chosen = finished[-1] if round_index is None else round_index
    if chosen not in finished:
        raise WorkdirError(f"{workdir.root}: round {chosen} has not finished (finished: {finished})")
    paths = workdir.round(chosen)
    result = paths.result(method)
    if not result.is_dir():
        if paths.checkpoints.is_dir():  # gal_jax 0.1 kept a finished round's UNet in its checkpoint
            raise WorkdirError(f"{result}: missing (workdirs of gal_jax 0.1 keep the UNet in the round's "
                               "orbax checkpoint: rerun `gal-jax run` on the workdir to write it)")
        raise WorkdirError(f"{result}: missing, and round {chosen} finished (its record exists): the workdir is "
                           "damaged (restore the folder, or run again in a new --workdir)")
    return chosen


def export_round(workdir: Path | str, round_index: int | None, out: Path | str, dtype: str | None = None) -> Path:
    """Returns `out` after writing round `round_index`'s model there as a diffusers SD folder."""
    workdir = Workdir(workdir)
    config = run_config(workdir)
    method = personalize.method_name(config)
    chosen = finished_round(workdir, round_index, method)
    base = inputs.resolve(config, need=("sd",)).sd
    return driver.write_round_pipeline(base, workdir.round(chosen).result(method), Path(out).expanduser(),
                                       dtype or config.export.dtype)


def sample_from_run(workdir: Path | str, round_index: int | None, prompts_file: Path, num_per_prompt: int | None,
                    out: Path | str | None = None) -> Path:
    """Returns the folder of images sampled from round `round_index`'s model (default: the last),
    `num_per_prompt` per prompt (default: the run's sample.num_per_prompt) with the run's sampler."""
    workdir = Workdir(workdir)
    config = run_config(workdir)
    cpu_devices.split_as_configured(config)  # as the run did, before the backend starts
    prompts = read_prompts(prompts_file)
    method = personalize.method_name(config)
    chosen = finished_round(workdir, round_index, method)
    sd, params = round_model(config, *load_base(config), workdir.round(chosen).result(method))
    out = Path(out).expanduser() if out else workdir.samples_dir(chosen)
    _sample(config, sd, params, prompts, num_per_prompt, out, _run_concept(config))
    return out


def round_model(config: ml_collections.ConfigDict, sd, params, result_dir: Path):
    """Returns (sd, params): the base model with a round's result (`DIR/rounds/<r>/unet` of
    DreamBooth, or the personalization folder of any other method) in place."""
    if personalize.method_name(config) == "dreambooth":
        unet = export.load_unet(sd, result_dir, param_dtype=config.model.param_dtype)
        return sd, dataclasses.replace(params, unet=unet)
    return export.personalized_model(sd, params, result_dir, param_dtype=config.model.param_dtype)


def _run_concept(config: ml_collections.ConfigDict):
    """Returns the run's concept when it has several subjects (its `{id}` prompt slots and MuDI's
    initial collages apply to sampling), else None."""
    paths = inputs.resolve(config, need=("concept",))
    if paths.concept is None or not concept_lib.is_multi_subject(paths.concept):
        return None
    return concept_lib.load_concept(config, paths.concept, None)


def sample_base(config: ml_collections.ConfigDict, prompts_file: Path, num_per_prompt: int | None,
                out: Path | str) -> Path:
    """Returns `out` after sampling from the config's base model (or any SD folder it names)."""
    prompts = read_prompts(prompts_file)
    sd, params = load_base(config)
    _sample(config, sd, params, prompts, num_per_prompt, Path(out).expanduser())
    return Path(out)


def load_base(config: ml_collections.ConfigDict):
    """Returns (sd, params) of the config's Stable Diffusion with its param and compute dtypes."""
    return driver.load_sd(config, inputs.resolve(config, need=("sd",)).sd)


def _sample(config, sd, params, prompts, num_per_prompt, out: Path, concept=None) -> None:
    """Samples `num_per_prompt` images of each prompt to `out`; with a multi-subject `concept`,
    `{id}` slots of the prompts name its subjects and config.sample.init_gamma > 0 starts every
    image from MuDI's collage of them."""
    num = int(config.sample.num_per_prompt if num_per_prompt is None else num_per_prompt)
    if num < 1:
        raise ValueError(f"--num_per_prompt={num} must be >= 1")
    init = None
    if concept is not None:
        prompts = [anchors.fill_named_slots(p, concept.subjects) for p in prompts]
        if config.sample.get("init_gamma", 0.0):
            grid = [(p, s) for p in range(len(prompts)) for s in range(num)]
            init = multi_subject.initial_images(concept.references, list(concept.subjects), sd.resolution,
                                                config.sample.seed, 0, grid)
    mesh = sharding.mesh_from_config(config.mesh)
    sample.sample_to_dir(config, sd, params, prompts, num, out, mesh=mesh, init_images=init)
