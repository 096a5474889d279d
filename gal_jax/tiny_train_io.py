"""Writes the trained tiny models in their users' layouts: a transformers CLIPModel, an SD pipeline.

Every model is written by our own modules (`gal_jax.nn.<family>.save_params`: PyTorch names,
safetensors, transformers' or diffusers' config.json), no PyTorch needed. Every name is checked:
a weight the target expects and the trained tree lacks (or the reverse) is an error, never a
silently random weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from gal_jax import models, tiny
from gal_jax.nn import clip as nn_clip
from gal_jax.nn import unet as nn_unet
from gal_jax.nn import vae as nn_vae

Params = Any
TORCH_DTYPES = ("float32", "float16")


def write_tokenizer(folder: Path, max_length: int) -> Path:
    """Writes the real-vocabulary CLIP tokenizer (tiny.write_tokenizer) padding to `max_length`."""
    tiny.write_tokenizer(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = int(max_length)
    config_file.write_text(json.dumps(config, indent=2))
    return folder


def load_tokenizer(folder: Path):
    """Returns the CLIPTokenizer saved in `folder`."""
    return models.tokenizer_class().from_pretrained(folder)


def tokenize_captions(tokenizer, captions) -> np.ndarray:
    """Returns int32 ids (n, model_max_length); raises ValueError naming a caption that would be cut."""
    limit = tokenizer.model_max_length
    for caption in dict.fromkeys(captions):
        if len(tokenizer(caption).input_ids) > limit:
            raise ValueError(f"caption {caption!r} is longer than the tokenizer's {limit} tokens")
    return models.tokenize(tokenizer, captions)


def _checked_dtype(dtype: str) -> str:
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
    return dtype


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


def save_clip(folder: Path, model: nn_clip.ClipModel, params: Params, dtype: str = "float16") -> Path:
    """Writes a transformers CLIPModel folder: weights in `dtype`, tokenizer padding to the text
    tower's positions, and the image processor our Scorer and CLIPProcessor both follow.

    The folder is read back with our loader: a weight that did not round-trip raises ValueError.
    """
    nn_clip.save_params(model, _host(params), folder, dtype=_checked_dtype(dtype))
    write_tokenizer(folder, model.config.text.max_position_embeddings)
    tiny.write_clip_preprocessor(folder, model.config.vision.image_size)
    _, loaded = models.load_clip(folder)
    _check_same(loaded, params, dtype, folder)
    return folder


def _check_same(loaded: Params, params: Params, dtype: str, folder: Path) -> None:
    """Raises ValueError unless `loaded` equals `params` rounded to `dtype`, leaf by leaf."""
    expected = traverse_util.flatten_dict(_host(params))
    for key, value in traverse_util.flatten_dict(loaded).items():
        rounded = expected[key].astype(dtype).astype(np.float32)
        if not np.array_equal(np.asarray(value, np.float32), rounded):
            raise ValueError(f"{folder}: saved weight {'/'.join(key)} differs from the trained one")


def save_text_encoder(folder: Path, clip_folder: Path, dtype: str = "float16") -> Path:
    """Writes the text tower of the CLIPModel folder `clip_folder`, bit for bit, as a CLIPTextModel
    folder (SD's text_encoder)."""
    clip = nn_clip.ClipModel(nn_clip.read_config(clip_folder))
    params = nn_clip.load_params(clip, clip_folder)  # float32 holds the stored float16 exactly
    text = nn_clip.ClipTextModel(clip.config.text)
    nn_clip.save_params(text, {"text_model": params["text_model"]}, folder, dtype=_checked_dtype(dtype))
    return folder


# ---------------------------------------------------------------------------------------------
# VAE and UNet
# ---------------------------------------------------------------------------------------------


def save_vae(folder: Path, vae_config: dict, params: Params, scaling_factor: float,
             dtype: str = "float16") -> Path:
    """Writes a diffusers AutoencoderKL folder of our VAE's params, with its scaling_factor."""
    config = nn_vae.VaeConfig.from_dict(dict(vae_config, scaling_factor=float(scaling_factor)))
    nn_vae.save_params(nn_vae.AutoencoderKL(config), _host(params), folder, dtype=_checked_dtype(dtype))
    return folder


def save_random_unet(folder: Path, unet_config: dict, seed: int) -> Path:
    """Writes a randomly initialised diffusers UNet2DConditionModel folder (our modules' init)."""
    import jax

    model = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(unet_config))
    nn_unet.save_params(model, _host(nn_unet.init_params(model, jax.random.key(seed))), folder)
    return folder


def write_pipeline_files(folder: Path, prediction_type: str = "epsilon") -> None:
    """Writes SD's scheduler config (SD 1.x's noise schedule, the given prediction type) and the
    pipeline's model_index.json into `folder`."""
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = dict(tiny.SD1_SCHEDULER, prediction_type=prediction_type)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(tiny._model_index(), indent=2))


def _host(params: Params) -> Params:
    """Returns the params as host numpy arrays (float32 for any float leaf)."""
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
