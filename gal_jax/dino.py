"""DINOv2 image embeddings for the DINO image-similarity metric (optional, beside IMG-ALN).

The authors' evaluator runs transformers' PyTorch Dinov2Model behind the slow (PIL) BitImageProcessor
and mean-pools the last hidden state. Here the model is our Flax DINOv2 (`gal_jax.nn.dino`, checked
against transformers to 1e-5) under one jitted forward, and the preprocessing is the slow
processor's, reproduced with numpy and PIL (checked against it to 1e-6): no PyTorch at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from gal_jax.nn import dino as nn_dino

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# The image processors whose slow implementation `DinoPreprocessing` reproduces.
SUPPORTED_PROCESSORS = ("BitImageProcessor", "BitImageProcessorFast")
# BitImageProcessor's defaults for fields a preprocessor_config.json leaves out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


# ---------------------------------------------------------------------------------------------
# Preprocessing: transformers' slow BitImageProcessor on uint8 RGB arrays
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DinoPreprocessing:
    """What BitImageProcessor (slow) does to an image, as its preprocessor_config.json sets it.

    Resize (PIL, `resample`) so that the shorter side is `shortest_edge` (aspect kept, the longer
    side truncated to an int), or to exactly `resize_to` (height, width); center-crop to
    `crop_size` (height, width), zero-padding an image smaller than it; multiply by
    `rescale_factor`; subtract `image_mean` and divide by `image_std` per channel.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    resample: int = PIL_BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self):
        if self.do_resize and (self.shortest_edge is None) == (self.resize_to is None):
            raise ValueError("resizing needs exactly one of shortest_edge and resize_to")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean {self.image_mean} and image_std {self.image_std}: need 3 values each"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DinoPreprocessing:
        """Returns the preprocessing of a BitImageProcessor config dict (its defaults fill gaps).

        `size` is an int or {"shortest_edge"} (the shorter side; a "longest_edge" beside it is
        ignored, as BitImageProcessor ignores it) or {"height", "width"} / [height, width];
        `crop_size` an int (square) or {"height", "width"}.
        """
        shortest_edge, resize_to = _resize_target(values.get("size", {"shortest_edge": 224}))
        return cls(
            do_resize=bool(values.get("do_resize", True)),
            shortest_edge=shortest_edge,
            resize_to=resize_to,
            resample=int(values.get("resample", PIL_BICUBIC)),
            do_center_crop=bool(values.get("do_center_crop", True)),
            crop_size=_crop_size(values.get("crop_size", 224)),
            do_rescale=bool(values.get("do_rescale", True)),
            rescale_factor=float(values.get("rescale_factor", 1 / 255)),
            do_normalize=bool(values.get("do_normalize", True)),
            image_mean=_channel_values(values.get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            image_std=_channel_values(values.get("image_std", OPENAI_CLIP_STD), "image_std"),
        )


def _resize_target(size: Any) -> tuple[int | None, tuple[int, int] | None]:
    """Returns (shortest_edge, None) or (None, (height, width)) of a processor's `size`, read as
    transformers' get_size_dict(size, default_to_square=False) then BitImageProcessor.resize do."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, (int(size[0]), int(size[1]))
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"]), None
    if isinstance(size, dict) and "height" in size and "width" in size:
        return None, (int(size["height"]), int(size["width"]))
    raise ValueError(f"size {size!r}: expected an int, {{'shortest_edge'}} or {{'height', 'width'}}")


def _crop_size(crop_size: Any) -> tuple[int, int]:
    """Returns (height, width) of a processor's `crop_size` (an int is a square)."""
    if isinstance(crop_size, int) and not isinstance(crop_size, bool):
        return crop_size, crop_size
    if isinstance(crop_size, (list, tuple)) and len(crop_size) == 2:
        return int(crop_size[0]), int(crop_size[1])
    if isinstance(crop_size, dict) and "height" in crop_size and "width" in crop_size:
        return int(crop_size["height"]), int(crop_size["width"])
    raise ValueError(f"crop_size {crop_size!r}: expected an int or {{'height', 'width'}}")


def _channel_values(values: Any, name: str) -> tuple[float, ...]:
    """Returns per-channel floats of a processor's mean or std (one number stands for all three)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),) * 3
    if isinstance(values, (list, tuple)):
        return tuple(float(value) for value in values)
    raise ValueError(f"{name} {values!r}: expected a number or a list of 3")


def read_preprocessing(path: str | Path) -> DinoPreprocessing:
    """Returns the preprocessing in a `preprocessor_config.json` (or the folder holding it).

    Raises ValueError naming the file when it is unreadable, not a BitImageProcessor's, or holds
    settings BitImageProcessor would refuse.
    """
    file = Path(path) / PREPROCESSOR_FILE if Path(path).is_dir() else Path(path)
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable preprocessor_config.json ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{file}: not an image processor config (expected a JSON object)")
    processor = values.get("image_processor_type", SUPPORTED_PROCESSORS[0])
    if processor not in SUPPORTED_PROCESSORS:
        raise ValueError(
            f"{file}: image_processor_type is {processor!r}; only {' / '.join(SUPPORTED_PROCESSORS)} "
            "(DINOv2's) is reproduced"
        )
    try:
        return DinoPreprocessing.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: unsupported image processor settings ({err})") from err


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Returns the (height, width) whose shorter side is `shortest_edge`, the aspect kept.

    transformers' get_resize_output_image_size(default_to_square=False): the longer side is
    int(shortest_edge * long / short), truncated, and a square image counts as taller than wide.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Returns the centered `height` x `width` crop of an (H, W, C) image, as transformers' center_crop.

    The crop starts at (H - height) // 2; a side shorter than the crop is first zero-padded,
    ceil of half the shortfall before it.
    """
    orig_height, orig_width = image.shape[:2]
    top, left = (orig_height - height) // 2, (orig_width - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    padded_height, padded_width = max(height, orig_height), max(width, orig_width)
    padded = np.zeros((padded_height, padded_width, *image.shape[2:]), image.dtype)
    top_pad = math.ceil((padded_height - orig_height) / 2)
    left_pad = math.ceil((padded_width - orig_width) / 2)
    padded[top_pad : top_pad + orig_height, left_pad : left_pad + orig_width] = image
    top, left = top + top_pad, left + left_pad
    rows = slice(max(0, top), min(padded_height, top + height))
    columns = slice(max(0, left), min(padded_width, left + width))
    return padded[rows, columns]


def preprocess_image(image: np.ndarray, preprocessing: DinoPreprocessing) -> np.ndarray:
    """Returns the float32 (3, H', W') pixel values BitImageProcessor (slow) makes of a uint8
    (H, W, 3) RGB image.

    Same arithmetic as transformers: PIL resizes the uint8 image, rescaling multiplies in float64
    and rounds to float32, normalising subtracts and divides in float32.
    """
    if preprocessing.do_resize:
        if preprocessing.resize_to is not None:
            size = preprocessing.resize_to
        else:
            size = shortest_edge_size(*image.shape[:2], preprocessing.shortest_edge)
        resized = PIL.Image.fromarray(image).resize((size[1], size[0]), resample=preprocessing.resample)
        image = np.asarray(resized)
    if preprocessing.do_center_crop:
        image = center_crop(image, *preprocessing.crop_size)
    if preprocessing.do_rescale:
        image = (image.astype(np.float64) * preprocessing.rescale_factor).astype(np.float32)
    if preprocessing.do_normalize:
        image = image.astype(np.float32)  # a no-op after rescaling; uint8 otherwise
        mean = np.asarray(preprocessing.image_mean, np.float32)
        std = np.asarray(preprocessing.image_std, np.float32)
        image = (image - mean) / std
    return np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32)


def preprocess(images: np.ndarray, preprocessing: DinoPreprocessing) -> np.ndarray:
    """Returns float32 (n, 3, H', W') pixel values of uint8 (n, H, W, 3) RGB images."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images of shape {images.shape} and dtype {images.dtype}: expected uint8 (n, H, W, 3)"
        )
    return np.stack([preprocess_image(image, preprocessing) for image in images])


# ---------------------------------------------------------------------------------------------
# The embedder
# ---------------------------------------------------------------------------------------------


def mean_token_embeddings(model: nn_dino.Dinov2Model, params, pixel_values: jax.Array) -> jax.Array:
    """Returns the float32 mean over all tokens (class token and patches) of the last hidden state,
    (B, D): the authors' DINOEvaluator's `last_hidden_state.mean(dim=1)`."""
    last_hidden_state = model.apply({"params": params}, pixel_values).last_hidden_state
    return jnp.mean(last_hidden_state.astype(jnp.float32), axis=1)


def _padded_to(rows: np.ndarray, size: int) -> np.ndarray:
    """Returns `rows` with zero rows appended up to `size` rows."""
    padding = np.zeros((size - len(rows), *rows.shape[1:]), rows.dtype)
    return np.concatenate([rows, padding]) if len(padding) else rows


class DinoEmbedder:
    """DINOv2 image embeddings: mean-pooled last hidden state, L2-normalised (the authors' DINOEvaluator).

    Loads a transformers-layout folder (config.json, model.safetensors, preprocessor_config.json),
    e.g. a local copy of facebook/dinov2-base. Images are preprocessed on the host a batch at a
    time; every batch is padded to `batch_size` so that one compiled forward (float32, on the
    default device) serves them all.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 32):
        path = Path(path).expanduser()
        missing = [name for name in (CONFIG_FILE, PREPROCESSOR_FILE) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path}: not a transformers DINOv2 folder (missing {', '.join(missing)}; needs "
                f"{CONFIG_FILE}, {PREPROCESSOR_FILE} and model.safetensors)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.preprocessing = read_preprocessing(path / PREPROCESSOR_FILE)
        self.model, self.params = nn_dino.load(path, dtype=jnp.float32, param_dtype=jnp.float32)
        self.batch_size = int(batch_size)
        self._forward = jax.jit(functools.partial(mean_token_embeddings, self.model))

    @property
    def hidden_size(self) -> int:
        """Returns the embedding width."""
        return self.model.config.hidden_size

    def image_embeddings(self, images: Any) -> np.ndarray:
        """Returns L2-normalised float64 embeddings (n, hidden) of uint8 (n, H, W, 3) images."""
        images = np.asarray(jax.device_get(images))
        pooled = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = _padded_to(preprocess(batch, self.preprocessing), self.batch_size)
            # Full float32 matmuls (no TF32 or bf16 passes on GPUs), as PyTorch's by default.
            with jax.default_matmul_precision("highest"):
                embeddings = self._forward(self.params, jax.device_put(pixels))
            pooled.append(np.asarray(jax.device_get(embeddings))[: len(batch)])
        if not pooled:
            return np.zeros((0, self.hidden_size), np.float64)
        embeddings = np.concatenate(pooled).astype(np.float64)
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
