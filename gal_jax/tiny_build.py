"""Builds the tiny world's trained models: CLIP, VAE and the text-to-image UNet, as users' folders.

`build_trained_tiny(out, images, captions, seed=...)` takes plain inputs (uint8 images (N, H, W, 3)
and one caption each), trains CLIP and the VAE (`tiny_train`) and then the UNet, from scratch, by
our own DreamBooth step (`trainer.Trainer`, unit weights, no prior) on an SD folder made of the
trained VAE, the CLIP's text tower as the text encoder (as SD 2 uses OpenCLIP's), the tokenizer and
SD 1.x's noise schedule, predicting `recipe.prediction_type` (v, as SD 2.x). It writes `out/clip`
(a transformers CLIPModel folder) and `out/sd` (a diffusers Stable Diffusion folder).
`train_tiny_world` does it on the tiny world and measures `tiny_figures`' figures 1 and 2.
PyTorch is used only to write the folders (`tiny_train_io`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gal_jax import data, export, io_utils, models, score, sharding, tiny_train_io
from gal_jax.tiny_train import (
    DEFAULT_RECIPE, LOG_EVERY, ClipData, Params, Recipe, caption_groups, init_clip, init_vae,
    latent_scaling_factor, retrieval_accuracy, split_held_out, train_clip, train_vae, trim_padding,
    vae_psnr, with_fresh_vision_tower, world_dataset, world_twins,
)

NUM_TRAIN = 10_000  # pretraining pictures of the shipped models
REPORT_FILE = "tiny_train.json"

# ---------------------------------------------------------------------------------------------
# The UNet, by our own DreamBooth step
# ---------------------------------------------------------------------------------------------


def unet_train_config(recipe: Recipe, seed: int) -> ml_collections.ConfigDict:
    """Returns the experiment config whose train.* and data.* make Trainer pretrain the UNet:
    unit weights, no prior, no augmentation (latents encoded once), cosine schedule."""
    from configs import common

    schedule = recipe.unet_schedule
    config = common.get_config()
    config.data.resolution = int(recipe.vae["sample_size"])
    config.data.random_crop = config.data.flip = False
    config.train.update(schedule.train_config())
    config.train.update(
        with_prior=False, cache_latents=True, log_every=LOG_EVERY,
        checkpoint_every=schedule.steps, seed=seed,
    )
    return config


def write_unet_training_set(folder: Path, images: np.ndarray, captions: Sequence[str], tokenize,
                            caption_dropout: float, seed: int) -> Path:
    """Writes the images as PNGs and, with data.write_training_set, the DreamBooth set of them:
    every image with its caption at weight 1, a random `caption_dropout` share once more with
    the empty caption. Returns the set's folder."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    references = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        io_utils.write_png(image_dir / f"{i:06d}.png", image)
        references.append(data.Reference(image_dir / f"{i:06d}.png", caption, None, 1.0, "tiny world"))
    dropped = np.random.default_rng(seed).permutation(len(references))[: round(len(references) * caption_dropout)]
    references += [dataclasses.replace(references[i], prompt="") for i in np.sort(dropped)]
    return data.write_training_set(references, [], None, folder / "train_set", tokenize,
                                   resolution=images.shape[1])


def train_unet(sd_dir: Path, images: np.ndarray, captions: Sequence[str], recipe: Recipe, seed: int,
               work_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Trains the UNet of the SD folder from its (random) weights with trainer.Trainer and writes
    it back with export.save_unet; returns the round's metrics."""
    from gal_jax import trainer

    sd, sd_params = models.load_stable_diffusion(sd_dir)
    train_set = write_unet_training_set(work_dir, images, captions, sd.tokenize, recipe.caption_dropout, seed)
    mesh = sharding.make_mesh()
    result, metrics = trainer.Trainer(unet_train_config(recipe, seed), sd, mesh).train_round(
        sd_params, train_set, progress=progress, desc="UNet"
    )
    export.save_unet(sd, jax.device_get(result.unet), sd_dir / "unet", dtype=recipe.dtype)
    return metrics


# ---------------------------------------------------------------------------------------------
# The whole build
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
    """What a build measured: losses, CLIP retrieval accuracy, VAE PSNR, timings, sizes."""

    seed: int
    num_train: int
    num_held_out: int
    clip_loss: float = math.nan
    clip_train_accuracy: float = math.nan
    clip_held_out_accuracy: float = math.nan
    vae_loss: float = math.nan
    vae_train_psnr: float = math.nan
    vae_held_out_psnr: float = math.nan
    vae_scaling_factor: float = math.nan
    unet_loss: float = math.nan
    vae_from: str | None = None  # the VAE was copied from this folder, not trained
    clip_from: str | None = None  # CLIP (and so SD's text encoder) was copied from this folder
    # tiny_figures' figure 1 (CLIP zero-shot, judge agreement) and 2 (base model's contexts)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    megabytes: dict[str, float] = dataclasses.field(default_factory=dict)
    loss_curves: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """Returns the figures as a few readable lines."""
        seconds = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        sizes = ", ".join(f"{k} {v:.1f} MB" for k, v in self.megabytes.items())
        return "\n".join([
            (f"CLIP: not trained (taken from {self.clip_from})" if self.clip_from else
             f"CLIP: loss {self.clip_loss:.3f}, top-1 caption retrieval {self.clip_train_accuracy:.1%} "
             f"train / {self.clip_held_out_accuracy:.1%} held-out"),
            (f"VAE: not trained (taken from {self.vae_from})" if self.vae_from else
             f"VAE: loss {self.vae_loss:.4f}, PSNR {self.vae_train_psnr:.1f} dB train / "
             f"{self.vae_held_out_psnr:.1f} dB held-out, scaling_factor {self.vae_scaling_factor:.4f}"),
            f"UNet: loss {self.unet_loss:.4f}",
            *self._figure_lines(),
            f"time: {seconds}",
            f"size: {sizes}",
        ])


    def _figure_lines(self) -> list[str]:
        lines = []
        zero_shot = self.figures.get("clip_zero_shot")
        if zero_shot:
            parts = [f"{name} {zero_shot[name]['clip_accuracy']:.1%} (judge agrees {zero_shot[name]['judge_agrees_with_clip']:.1%})"
                     for name in ("context", "object", "colour")]
            lines.append(f"CLIP zero-shot on {zero_shot['images']} held-out pictures: " + ", ".join(parts))
        blurred = self.figures.get("clip_zero_shot_on_vae_round_trips")
        if blurred:
            parts = [f"{name} {blurred[name]['clip_accuracy']:.1%}" for name in ("context", "object", "colour")]
            lines.append("CLIP zero-shot on the VAE's round trips of them: " + ", ".join(parts))
        round_trips = self.figures.get("judge_on_vae_round_trips")
        if round_trips:
            worst = min(round_trips["per_context"], key=round_trips["per_context"].get)
            lines.append(f"judge on the VAE's round trips of {round_trips['images']} held-out pictures: "
                         f"{round_trips['accuracy']:.1%}, lowest {round_trips['min']:.1%} ({worst!r})")
        following = self.figures.get("base_context_following")
        if following:
            worst = min(following["per_context"], key=following["per_context"].get)
            lines.append(f"base SD draws the prompt's context: mean {following['mean']:.1%}, lowest "
                         f"{following['min']:.1%} ({worst!r}), {following['images_per_context']} pictures each")
        return lines


def train_tiny_world(out: Path | str, *, seed: int = 0, recipe: Recipe = DEFAULT_RECIPE,
                     num_train: int = NUM_TRAIN, progress: bool = True,
                     vae_from: Path | str | None = None, clip_from: Path | str | None = None) -> "BuildReport":
    """Trains the tiny default's models on `num_train` pictures of the tiny world from `seed`,
    writes out/clip and out/sd, measures figures 1 and 2 (`tiny_figures`) and returns the report
    (also in out/tiny_train.json). CLIP's hard negatives are `hard_negatives`' (the recipe's
    object and colour swaps), its twins `world_twins`' (the recipe's `clip_twins`); `vae_from` and
    `clip_from` as `build_trained_tiny` takes them (with `clip_from` no twin is drawn)."""
    from gal_jax import tiny_world

    # Bad folders are refused before the pictures are drawn (build_trained_tiny checks them again).
    if vae_from is not None:
        _checked_vae_folder(vae_from, recipe)
    if clip_from is not None:
        _checked_clip_folder(clip_from, recipe)
    images, captions = world_dataset(num_train, seed)
    twins = None
    if recipe.clip_twins and clip_from is None:
        twin_images, twin_captions = world_twins(num_train, seed, recipe.clip_twins)
        twins = Twins(twin_images, twin_captions, hard_negatives(twin_captions, recipe))
    report = build_trained_tiny(out, images, captions, seed=seed, recipe=recipe, progress=progress,
                                plain_captions=[tiny_world.without_identifiers(c) for c in captions],
                                negative_captions=hard_negatives(captions, recipe),
                                vae_from=vae_from, clip_from=clip_from, twins=twins)
    with io_utils.timed(report.seconds, "figures"):
        report.figures = measure_figures(Path(out).expanduser().absolute(), progress=progress,
                                         held_out=recipe.figure_images, per_context=recipe.figure_per_context)
    io_utils.write_json(Path(out).expanduser().absolute() / REPORT_FILE, dataclasses.asdict(report))
    return report


def hard_negatives(captions: Sequence[str], recipe: Recipe) -> list[tuple[str, ...]] | None:
    """Returns each caption's hard-negative captions for CLIP as the recipe asks (its object swaps,
    then its colour swaps), or None when it asks for none."""
    from gal_jax import tiny_world

    swaps = [swap for wanted, swap in ((recipe.clip_object_negatives, tiny_world.object_swaps),
                                       (recipe.clip_colour_negatives, tiny_world.colour_swaps)) if wanted]
    if not swaps:
        return None
    return [tuple(n for swap in swaps for n in swap(c)) for c in captions]


def measure_figures(out: Path, *, held_out: int, per_context: int, progress: bool = True) -> dict[str, Any]:
    """Returns tiny_figures' figures 1 and 2 for the models in out/clip and out/sd."""
    from gal_jax import sample, tiny_figures

    mesh = sharding.make_mesh()
    clip, clip_params = models.load_clip(out / "clip")
    scorer = score.Scorer(clip, clip_params, mesh)
    scenes = tiny_figures.held_out_scenes(held_out)
    figures = {"clip_zero_shot": tiny_figures.clip_zero_shot(scorer, scenes)}
    sd, sd_params = models.load_stable_diffusion(out / "sd")
    generator = sample.Generator(sd, mesh, sampler="ddim", steps=25, guidance_scale=5.0, max_images_per_device=64)
    round_trips = tiny_figures.vae_round_trips(sd, sd_params, scenes)
    figures["judge_on_vae_round_trips"] = tiny_figures.judge_context_accuracy(round_trips)
    # What GAL's oracle faces: the CLIP on pictures no sharper than the SD can draw.
    figures["clip_zero_shot_on_vae_round_trips"] = tiny_figures.clip_zero_shot(scorer, round_trips)
    figures["base_context_following"] = tiny_figures.base_context_following(generator, sd_params, per_context)
    return figures


class Twins(NamedTuple):
    """Each training picture's twin (`tiny_world.training_twins`), row for row with the pictures:
    its pixels, its caption, and its own negative captions (None when the pictures have none)."""
    images: np.ndarray
    captions: Sequence[str]
    negative_captions: Sequence[Sequence[str]] | None = None


def build_trained_tiny(out: Path | str, images: np.ndarray, captions: Sequence[str], *, seed: int = 0,
                       recipe: Recipe = DEFAULT_RECIPE, progress: bool = True,
                       plain_captions: Sequence[str] | None = None,
                       negative_captions: Sequence[Sequence[str]] | None = None,
                       vae_from: Path | str | None = None,
                       clip_from: Path | str | None = None,
                       twins: Twins | None = None,
                       ) -> BuildReport:
    """Trains CLIP, VAE and UNet from `seed` on the captioned images; writes out/clip and out/sd.

    `plain_captions` (one per image: the caption without its identifier words, e.g. "sks") makes
    CLIP's text tower map a caption and its plain form to the same embedding
    (`tiny_train.identifier_loss`), so a placeholder shifts no CLIP similarity.
    `negative_captions` (the same number K per image) are extra negatives of each image's
    image-to-text term (`tiny_train.contrastive_loss`): captions that differ from its own in what
    random batches would not teach (the object kind).
    `twins` (`Twins`; a plain (images, captions, negative captions) tuple works too), row for row
    with `images`: each picture's twin, differing in one attribute (`tiny_world.training_twins`),
    and with `negative_captions` the twins' own; CLIP's batches then pair every picture with its twin (the
    UNet never sees them).
    `vae_from`: an SD folder whose VAE (`vae/`, with its scaling factor) is taken as it is instead
    of training one: the VAE depends on the pictures only, so a rebuild that changes CLIP or the
    UNet can keep it (the report's VAE figures are then NaN).
    `clip_from`: a CLIP folder (another build's clip/) taken as it is instead of training CLIP, its
    text tower becoming SD's text encoder: a UNet trained on a CLIP built in stages or elsewhere
    (the report's CLIP training figures are then NaN; captions' extras and twins go unused).

    A random `recipe.held_out_fraction` of the images is held out to measure CLIP and the VAE.
    Both folders are built beside their targets and renamed into place only when all three
    models are done, so a killed build leaves the previous ones. Returns what it measured (also
    written to out/REPORT_FILE).
    """
    images = _checked_images(images, captions, recipe)
    if twins is not None:
        twins = Twins(*twins)
        twins = Twins(_checked_images(twins.images, twins.captions, recipe), list(twins.captions),
                      twins.negative_captions)
        if len(twins.captions) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(twins.captions)} twins")
        if (negative_captions is None) != (twins.negative_captions is None):
            raise ValueError("negative captions must be given for both the pictures and their twins, or for neither")
    for name, extra in (("plain captions", plain_captions), ("negative caption lists", negative_captions)):
        if extra is not None and len(extra) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(extra)} {name}")
    if negative_captions is not None and len({len(n) for n in negative_captions}) > 1:
        raise ValueError("every caption needs the same number of negative captions, got "
                         f"{sorted({len(n) for n in negative_captions})}")
    vae_source = None if vae_from is None else _checked_vae_folder(vae_from, recipe)
    clip_source = None if clip_from is None else _checked_clip_folder(clip_from, recipe)
    out = Path(out).expanduser().absolute()
    report = BuildReport(seed=seed, num_train=0, num_held_out=0,
                         vae_from=None if vae_source is None else str(vae_source),
                         clip_from=None if clip_source is None else str(clip_source))
    train_rows, held_rows = split_held_out(len(images), recipe.held_out_fraction, seed)
    report.num_train, report.num_held_out = len(train_rows), len(held_rows)
    # What a killed build left: its staging folder goes when the new one is made beside out/sd,
    # replace_dir's holder of the old out/clip here.
    io_utils.remove_dead_temporaries(out, "clip")
    staging = io_utils.temporary_dir_beside(out / "sd")
    try:
        if clip_source is None:
            with io_utils.timed(report.seconds, "clip"):
                _train_clip_into(staging, report, images, captions, train_rows, held_rows, recipe, seed, progress,
                                 plain_captions, negative_captions, twins)
        else:
            shutil.copytree(clip_source, staging / "clip")
        vae_params = None
        if vae_source is None:
            with io_utils.timed(report.seconds, "vae"):
                _, vae_params = _build_vae(report, images, train_rows, held_rows, recipe, seed + 1, progress)
        sd_dir = _write_untrained_sd(staging / "sd", staging / "clip", recipe, vae_params,
                                     report.vae_scaling_factor, seed + 2, vae_source)
        with io_utils.timed(report.seconds, "unet"):
            metrics = train_unet(sd_dir, images[train_rows], [captions[i] for i in train_rows], recipe,
                                 seed + 3, staging / "unet_data", progress)
        report.unet_loss, report.loss_curves["unet"] = metrics["loss"], [p["loss"] for p in metrics["loss_curve"]]
        for name in ("clip", "sd"):
            report.megabytes[name] = _folder_megabytes(staging / name)
            io_utils.replace_dir(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    io_utils.write_json(out / REPORT_FILE, dataclasses.asdict(report))
    return report


def _train_clip_into(staging: Path, report, images, captions, train_rows, held_rows, recipe, seed, progress,
                     plain_captions, negative_captions, twins: Twins | None) -> None:
    """Tokenizes the captions (and their extras), trains CLIP and writes it to staging/clip."""
    tokenizer = tiny_train_io.load_tokenizer(tiny_train_io.write_tokenizer(staging / "tokenizer", recipe.max_length))
    ids = tiny_train_io.tokenize_captions(tokenizer, captions)
    plain_ids = None if plain_captions is None else tiny_train_io.tokenize_captions(tokenizer, plain_captions)

    def tokenize_rows(rows):  # (N, K) captions -> (N, K, L) ids
        if rows is None:
            return None
        flat = tiny_train_io.tokenize_captions(tokenizer, [n for row in rows for n in row])
        return flat.reshape(len(rows), -1, flat.shape[-1])

    negative_ids = tokenize_rows(negative_captions)
    groups = caption_groups(list(captions) + ([] if twins is None else twins.captions))
    twin_data = None
    if twins is not None:
        twin_data = (twins.images, tiny_train_io.tokenize_captions(tokenizer, twins.captions),
                     groups[len(captions):], tokenize_rows(twins.negative_captions))
    groups = groups[: len(captions)]
    model, clip_params = _build_clip(report, images, ids, groups, train_rows, held_rows, recipe, seed, progress,
                                     plain_ids, negative_ids, twin_data)
    tiny_train_io.save_clip(staging / "clip", model, clip_params, recipe.dtype)


def _build_clip(report, images, ids, groups, train_rows, held_rows, recipe, seed, progress, plain_ids=None,
                negative_ids=None, twins=None):
    model, params = init_clip(recipe, seed, recipe.joint_vision)
    twin_images, twin_ids, twin_groups, twin_negative_ids = (None,) * 4 if twins is None else twins
    ids, plain_ids, negative_ids, twin_ids, twin_negative_ids = trim_padding(
        ids, plain_ids, negative_ids, twin_ids, twin_negative_ids, eos_token_id=int(recipe.text["eos_token_id"]))

    def rows(x):
        return None if x is None else jnp.asarray(x[train_rows])

    clip_data = ClipData(rows(images), rows(ids), rows(groups), rows(plain_ids), rows(negative_ids),
                         rows(twin_images), rows(twin_ids), rows(twin_groups), rows(twin_negative_ids))
    params, losses = train_clip(model, params, clip_data, recipe.clip_schedule, seed, progress)
    if recipe.clip_locked_schedule is not None:
        if recipe.joint_vision is not None:
            model, params = with_fresh_vision_tower(recipe, params, seed + 50)
        params, more = train_clip(model, params, clip_data, recipe.clip_locked_schedule, seed + 100, progress,
                                  locked_text=True)
        losses = losses + more
    probe = train_rows[: len(held_rows)]  # as many training images as held-out ones: comparable
    report.clip_loss, report.loss_curves["clip"] = losses[-1], losses
    report.clip_train_accuracy = retrieval_accuracy(model, params, images[probe], ids[probe], groups[probe])
    report.clip_held_out_accuracy = retrieval_accuracy(model, params, images[held_rows], ids[held_rows],
                                                       groups[held_rows])
    return model, params


def _build_vae(report, images, train_rows, held_rows, recipe, seed, progress):
    vae, params = init_vae(recipe, seed)
    params, losses = train_vae(vae, params, jnp.asarray(images[train_rows]), recipe, seed, progress)
    probe = train_rows[: len(held_rows)]
    report.vae_loss, report.loss_curves["vae"] = losses[-1], losses
    report.vae_train_psnr = vae_psnr(vae, params, images[probe])
    report.vae_held_out_psnr = vae_psnr(vae, params, images[held_rows])
    report.vae_scaling_factor = latent_scaling_factor(vae, params, images[train_rows[:2048]], seed)
    return vae, params


def _write_untrained_sd(folder: Path, clip_dir: Path, recipe: Recipe, vae_params: Params | None,
                        scaling_factor: float, seed: int, vae_source: Path | None = None) -> Path:
    """Writes the SD folder to pretrain: trained VAE (or a copy of `vae_source`), the CLIP's text
    tower, a random UNet."""
    if vae_source is None:
        tiny_train_io.save_vae(folder / "vae", dict(recipe.vae), vae_params, scaling_factor, recipe.dtype)
    else:
        shutil.copytree(vae_source, folder / "vae")
    tiny_train_io.save_text_encoder(folder / "text_encoder", clip_dir, recipe.dtype)
    tiny_train_io.write_tokenizer(folder / "tokenizer", recipe.max_length)
    tiny_train_io.save_random_unet(folder / "unet", dict(recipe.unet), seed)
    tiny_train_io.write_pipeline_files(folder, recipe.prediction_type)
    return folder


def _checked_vae_folder(sd_folder: Path | str, recipe: Recipe) -> Path:
    """Returns sd_folder/vae if it holds a VAE of the recipe's architecture, or raises ValueError."""
    folder = Path(sd_folder).expanduser().absolute() / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: not found; --vae_from must be a Stable Diffusion folder with vae/")
    config = io_utils.read_json(config_file)
    different = sorted(k for k, v in recipe.vae.items() if _as_json(config.get(k)) != _as_json(v))
    if different:
        raise ValueError(f"{config_file}: its VAE differs from the recipe's in {', '.join(different)}")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no safetensors weights")
    return folder


def _checked_clip_folder(clip_folder: Path | str, recipe: Recipe) -> Path:
    """Returns the folder if it holds a CLIPModel whose text tower is the recipe's (it becomes the
    tiny SD's text encoder, which the recipe's UNet attends to) with its tokenizer at the recipe's
    length, or raises ValueError."""
    folder = Path(clip_folder).expanduser().absolute()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: not found; --clip_from must be a CLIP folder (a build's clip/)")
    config = io_utils.read_json(config_file)
    text = config.get("text_config") if isinstance(config, dict) else None
    if not isinstance(text, dict) or config.get("model_type") != "clip":
        raise ValueError(f"{config_file}: not a CLIPModel config (model_type 'clip' with a text_config)")
    different = sorted(k for k, v in recipe.text.items() if _as_json(text.get(k)) != _as_json(v))
    if different:
        raise ValueError(f"{config_file}: its text tower differs from the recipe's in {', '.join(different)}")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no safetensors weights")
    tokenizer_file = folder / "tokenizer_config.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{tokenizer_file}: not found; the CLIP folder needs its tokenizer")
    length = io_utils.read_json(tokenizer_file).get("model_max_length")
    if length != recipe.max_length:
        raise ValueError(f"{tokenizer_file}: the tokenizer pads to {length} tokens, the recipe's to {recipe.max_length}")
    return folder


def _as_json(value):
    return list(value) if isinstance(value, tuple) else value


def _checked_images(images, captions: Sequence[str], recipe: Recipe) -> np.ndarray:
    """Returns the images as uint8 (N, S, S, 3) at the VAE's sample size S, or raises ValueError."""
    images = np.asarray(images)
    size = int(recipe.vae["sample_size"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images must be uint8 (N, {size}, {size}, 3), got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return images


def _folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
