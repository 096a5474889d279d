"""The embedded tiny default: a small Stable Diffusion and CLIP in their real layouts.

`make_tiny(root, trained=...)` puts a tiny default's models and data under `root`:
- random (`trained=False`, the default run's today): random-init models built here from our own
  modules (`gal_jax.nn`) and fixed seeds, and the simple concept set of `tiny_data`: fast and
  arbitrary, they exercise the machinery and show nothing about the method.
- trained (`--config.model.tiny_world=true`): the tiny SD and CLIP trained on the procedural
  tiny world (`tiny_world`, `tiny_train`), shipped in `gal_jax/assets/tiny_world/` and copied into
  place, with the world's concepts written by `tiny_world.write_world`. No PyTorch, no download.

Both are saved exactly as users' downloaded models are (diffusers pipeline folder; transformers
CLIPModel folder; safetensors), so the default run and the tests go through the same loading code
as real weights. The tokenizer uses the real CLIP BPE vocabulary shipped in `gal_jax/assets/`, so
token ids are the real ones.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from gal_jax import CACHE_ROOT, io_utils, tiny_data

ASSETS = Path(__file__).parent / "assets"
BPE_FILE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
# The trained tiny models (`gal-jax make-tiny --train --out=...` writes them): clip/, sd/ and the
# build's figures in tiny_train.json.
SHIPPED_MODELS = ASSETS / "tiny_world"
TINY_VERSION = "tiny-v3"
# The random tiny CLIP's seed (see write_tiny_clip).
TINY_CLIP_SEED = 8
TINY_WORLD_VERSION = "tiny-world-v4"
DEFAULT_TINY_DIR = CACHE_ROOT / TINY_VERSION
DEFAULT_TINY_WORLD_DIR = CACHE_ROOT / TINY_WORLD_VERSION


def default_dir(trained: bool) -> Path:
    """Returns where the tiny default of that kind is built when the config names no tiny_dir."""
    return DEFAULT_TINY_WORLD_DIR if trained else DEFAULT_TINY_DIR

# SD 1.x noise schedule and sampler (the PNDM config SD 1.5 ships with).
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
# A second layout so tests do not tune the loader to one shape: three levels, SD2-style linear
# projections and per-level head dims.
TINY_UNET_SD2 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    norm_num_groups=32,
)
TINY_VAE = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# A tiny SDXL in SDXL's layout: no attention at the first level, transformer depth per level, linear
# projections, two text encoders (the second with a projection, gelu, a different width) whose
# penultimate states make the context (32 + 48 features) and whose pooled embedding (40) joins
# six time ids of 8 features in the added embedding.
TINY_TEXT_SDXL_2 = dict(TINY_TEXT, hidden_size=48, intermediate_size=96, num_attention_heads=4, projection_dim=40,
                        hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_UNET_SDXL = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TINY_TEXT["hidden_size"] + TINY_TEXT_SDXL_2["hidden_size"],
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TINY_TEXT_SDXL_2["projection_dim"] + 6 * 8,
    norm_num_groups=32,
)
SDXL_SCHEDULER = dict(SD1_SCHEDULER, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                      use_karras_sigmas=False)
TINY_VISION = dict(
    image_size=224,
    patch_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)


@lru_cache(maxsize=1)
def clip_bpe_vocabulary() -> tuple[dict[str, int], list[str]]:
    """Returns (vocab, merges) of the real CLIP BPE, built as OpenAI CLIP / open_clip build them."""
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Writes a transformers CLIPTokenizer (vocab.json, merges.txt, configs) with the real vocabulary;
    SDXL's second tokenizer pads with "!"."""
    vocab, merges = clip_bpe_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": pad_token})
    )


def write_tiny_stable_diffusion(folder: Path, *, seed: int = 0, unet_config: dict = TINY_UNET) -> Path:
    """Writes a random-init tiny SD 1.x pipeline folder in the diffusers layout; returns it.

    The models are ours (`gal_jax.nn`), initialised from `seed` and written with diffusers' names
    and configs, so PyTorch diffusers and our loader read the folder alike; no PyTorch needed.
    """
    from gal_jax import tiny_train_io

    _write_random_models(folder, seed, unet_config, TINY_VAE, {"text_encoder": TINY_TEXT})
    write_tokenizer(folder / "tokenizer")
    tiny_train_io.write_pipeline_files(folder)
    return folder


def _write_random_models(folder: Path, seed: int, unet_config: dict, vae_config: dict, text_configs: dict) -> None:
    """Writes unet/, vae/ and one folder per text encoder ({name: config}; every one after the first
    with a projection, as SDXL's second) of random-init models under `folder`, from seed, seed + 1,
    seed + 2, ..."""
    import jax

    from gal_jax import tiny_train_io
    from gal_jax.nn import clip as nn_clip, vae as nn_vae

    folder.mkdir(parents=True, exist_ok=True)
    tiny_train_io.save_random_unet(folder / "unet", unet_config, seed)
    vae = nn_vae.AutoencoderKL(nn_vae.VaeConfig.from_dict(vae_config))
    nn_vae.save_params(vae, nn_vae.init_params(vae, jax.random.key(seed + 1)), folder / "vae")
    for offset, (name, text_config) in enumerate(text_configs.items()):
        text = nn_clip.ClipTextModel(nn_clip.ClipTextConfig.from_dict(text_config), projection=bool(offset))
        (folder / name).mkdir(exist_ok=True)
        nn_clip.save_params(text, nn_clip.init_params(text, jax.random.key(seed + 2 + offset)), folder / name)


def write_tiny_stable_diffusion_xl(folder: Path, *, seed: int = 0, unet_config: dict = TINY_UNET_SDXL) -> Path:
    """Writes a random-init tiny SDXL pipeline folder in the diffusers layout (two text encoders and
    tokenizers, a text_time UNet, SDXL's VAE scaling); returns it. As write_tiny_stable_diffusion:
    our modules, diffusers' names and configs, no PyTorch needed."""
    _write_random_models(folder, seed, unet_config, dict(TINY_VAE, scaling_factor=0.13025),
                         {"text_encoder": TINY_TEXT, "text_encoder_2": TINY_TEXT_SDXL_2})
    write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2))
    (folder / "model_index.json").write_text(json.dumps(_sdxl_model_index(), indent=2))
    return folder


def _sdxl_model_index() -> dict:
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.39.0",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.39.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_clip_preprocessor(folder: Path, size: int) -> Path:
    """Writes the `preprocessor_config.json` of a transformers CLIPImageProcessor (bicubic resize of
    the shortest edge to `size`, centre crop, rescale, OpenAI CLIP's normalisation), as its
    save_pretrained does; our Scorer reads the same file."""
    from gal_jax.models import CLIP_MEAN, CLIP_STD

    config = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    file = folder / "preprocessor_config.json"
    file.write_text(json.dumps(config, indent=2) + "\n")
    return file


def _with_transformers_clip_scales(params, config, seed: int):
    """Returns `params` with the attention, MLP, class-embedding and projection kernels redrawn
    at the scales transformers' CLIPPreTrainedModel._init_weights gives them (our modules draw
    every kernel at 0.02, which leaves a random tower's CLS output nearly blind to the image)."""
    import numpy as np
    from flax import traverse_util

    rng = np.random.default_rng(seed)
    towers = {"text_model": config.text, "vision_model": config.vision}

    def scale(path) -> float | None:
        tower = towers.get(path[0])
        name = path[-2] if path[-1] == "kernel" else path[-1]
        if path == ("text_projection", "kernel"):
            return config.text.hidden_size**-0.5
        if path == ("visual_projection", "kernel"):
            return config.vision.hidden_size**-0.5
        if tower is None:
            return None
        width, depth = tower.hidden_size, tower.num_hidden_layers
        return {
            "q_proj": width**-0.5 * (2 * depth) ** -0.5,
            "k_proj": width**-0.5 * (2 * depth) ** -0.5,
            "v_proj": width**-0.5 * (2 * depth) ** -0.5,
            "out_proj": width**-0.5,
            "fc1": (2 * width) ** -0.5,
            "fc2": width**-0.5 * (2 * depth) ** -0.5,
            "class_embedding": width**-0.5,
        }.get(name)

    flat = traverse_util.flatten_dict(params)
    for path in sorted(flat):
        std = scale(path) if path[-1] in ("kernel", "class_embedding") else None
        if std is not None:
            flat[path] = (rng.standard_normal(flat[path].shape) * std).astype(flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def write_tiny_clip(folder: Path, *, seed: int = TINY_CLIP_SEED) -> Path:
    """Writes a random-init tiny CLIPModel folder (weights, tokenizer, processor); returns it.

    A random CLIP's judgments are arbitrary and mostly driven by the text side: with many seeds
    every anchor prompt of the tiny concept scores as overfit (or none does), every entropy is 0
    and GAL stops after round 1. The default seed is one whose overfit rates are mixed, so the
    tiny default exercises the whole loop; it says nothing about the method's merit.
    """
    import jax

    from gal_jax.nn import clip as nn_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = nn_clip.ClipConfig(
        text=nn_clip.ClipTextConfig.from_dict(TINY_TEXT),
        vision=nn_clip.ClipVisionConfig.from_dict(TINY_VISION),
        projection_dim=TINY_TEXT["projection_dim"],
    )
    model = nn_clip.ClipModel(config)
    params = _with_transformers_clip_scales(nn_clip.init_params(model, jax.random.key(seed)), config, seed)
    nn_clip.save_params(model, params, folder)
    write_tokenizer(folder)
    write_clip_preprocessor(folder, TINY_VISION["image_size"])
    return folder


def make_tiny(root: Path | str = DEFAULT_TINY_DIR, *, force: bool = False, trained: bool | None = None
              ) -> dict[str, Path]:
    """Builds (once) the tiny SD, tiny CLIP and tiny concept data under `root`; returns their paths.

    `trained`: True, the shipped models trained on the tiny world and the world's concepts; False,
    random-init models and the `tiny_data` concepts; None, the kind `root` already holds (random
    for a new root). Each
    part is written to a temporary folder and renamed into place, so a killed build never leaves a
    half-written model behind; a root holding the other kind is refused.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    trained = _is_trained(root, trained)
    _claim_kind(root, "trained" if trained else "random")
    paths = make_tiny_paths(root, trained=trained)
    writers = {"sd": write_tiny_stable_diffusion, "clip": write_tiny_clip}
    if trained:
        writers = {name: functools.partial(_copy_shipped, name) for name in writers}
    for name, writer in writers.items():
        if force and paths[name].exists():
            shutil.rmtree(paths[name])
        if not paths[name].exists():
            tmp = io_utils.temporary_dir_beside(paths[name])
            try:
                writer(tmp / name)
                os.replace(tmp / name, paths[name])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if trained:
        from gal_jax import tiny_world

        tiny_world.write_world(root / "data", num_train=0)
    else:
        tiny_data.make_tiny_concepts(root / "data")
    return paths


_KIND_MARKER = ".tiny_kind"


def _is_trained(root: Path, trained: bool | None) -> bool:
    """Returns `trained`, or for None whether `root` holds the trained kind."""
    if trained is not None:
        return trained
    marker = root / _KIND_MARKER
    return marker.is_file() and marker.read_text().strip() == "trained"


def _claim_kind(root: Path, kind: str) -> None:
    """Records which kind of tiny default `root` holds; raises FileExistsError for the other kind."""
    marker = root / _KIND_MARKER
    if marker.is_file() and marker.read_text().strip() != kind:
        raise FileExistsError(f"{root}: holds the {marker.read_text().strip()} tiny default, not the {kind} one; "
                              "use another folder")
    if not marker.is_file():
        marker.write_text(kind + "\n")


def _copy_shipped(name: str, folder: Path) -> Path:
    """Copies the shipped trained model `name` (sd or clip) to `folder`."""
    source = SHIPPED_MODELS / name
    if not (source / "config.json").is_file() and not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source}: the trained tiny {name} is missing from the package; "
                                "rebuild it with `gal-jax make-tiny --train --out=gal_jax/assets/tiny_world`")
    shutil.copytree(source, folder)
    return folder


def make_tiny_paths(root: Path, *, trained: bool | None = None) -> dict[str, Path]:
    """Returns where make_tiny puts each part of the tiny default under `root` (builds nothing)."""
    root = Path(root).expanduser()
    if _is_trained(root, trained):
        from gal_jax import tiny_world

        data = tiny_world.world_paths(root / "data")
    else:
        data = tiny_data.concept_paths(root / "data")
    return {"root": root, "sd": root / "sd", "clip": root / "clip", **data}
