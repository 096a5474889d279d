"""Loading Stable Diffusion and CLIP from their on-disk layouts into Flax modules + param trees.

Everything else sees `StableDiffusion` and `ClipModel`: static objects with pure `apply`-style
methods taking param trees. The modules are our own (`gal_jax.nn`: UNet, VAE, CLIP); the only
library classes used here are transformers' CLIP tokenizer.

Weights are read by their PyTorch names from safetensors (single, sharded by an index, or the fp16
variant; numpy, no torch) or from a PyTorch `.bin` (needs torch; converted through a temporary
safetensors file), straight into the shapes of an abstract (`jax.eval_shape`) param tree, so no
random weights are ever materialised. Flax msgpack weights are refused with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gal_jax import sharding
from gal_jax.nn import clip as nn_clip
from gal_jax.nn import layers as nn_layers
from gal_jax.nn import unet as nn_unet
from gal_jax.nn import vae as nn_vae

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

Params = Any
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # besides SD_COMPONENTS
SDXL_TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_flax_model.msgpack",
)
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "flax_model.msgpack")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(ValueError):
    """A model folder is missing, incomplete or in the wrong layout."""


# ---------------------------------------------------------------------------------------------
# Static model objects
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """The static parts of a Stable Diffusion model: modules, tokenizer and configs (no weights).

    The VAE module works in NHWC (images and latents); the UNet takes and returns NCHW latents, as
    diffusers' does, so the latents every caller sees are NCHW.

    SD 1.x / 2.x have one text encoder (`text_encoder` a ClipTextModel). SDXL has two
    (`text_encoder` an nn.clip.SdxlTextEncoders, `tokenizer_2` the second tokenizer): token ids are
    both tokenizers' side by side (B, 2L), the text conditioning is (B, L + 1, D1 + D2) with the
    pooled embedding in its last row, and `apply_unet` unpacks it and adds the time ids, so every
    caller handles one (batch, tokens, features) array whatever the family. With
    `empty_prompt_is_zero` (SDXL's force_zeros_for_empty_prompt) the unconditional branch of
    guidance is all zeros rather than the empty prompt's encoding, as diffusers' pipeline does.
    """

    path: Path
    unet: nn_unet.UNet2DConditionModel
    vae: nn_vae.AutoencoderKL
    text_encoder: nn_clip.ClipTextModel | nn_clip.SdxlTextEncoders
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    tokenizer_2: CLIPTokenizer | None = None
    empty_prompt_is_zero: bool = False

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.text_encoder, nn_clip.SdxlTextEncoders)

    @property
    def vocab_size(self) -> int:
        """Returns the rows of the (smallest) token embedding table: every token id must be below it."""
        encoders = self.text_encoder.towers if self.is_sdxl else (self.text_encoder,)
        return min(encoder.config.vocab_size for encoder in encoders)

    @property
    def context_shape(self) -> tuple[int, int]:
        """Returns the (tokens, features) of one prompt's text conditioning (`encode_text`)."""
        if self.is_sdxl:
            return self.max_length + 1, self.text_encoder.context_width
        return self.max_length, self.text_encoder.config.hidden_size

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsampling_factor

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def resolution(self) -> int:
        """Native image resolution: the UNet's sample size times the VAE's downsampling."""
        size = self.unet.config.sample_size
        if size is None:  # diffusers leaves it out for some models; the VAE's is in pixels
            return int(self.vae.config.sample_size)
        return int(size[0] if isinstance(size, (tuple, list)) else size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def max_length(self) -> int:
        """Returns the tokenizer's limit L (tokens per prompt and tokenizer)."""
        return int(self.tokenizer.model_max_length)

    @property
    def token_length(self) -> int:
        """Returns the width of `tokenize`'s ids: L, or 2L for SDXL's two tokenizers."""
        return self.max_length * (2 if self.is_sdxl else 1)

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Returns int32 token ids (len(prompts), max_length), padded and truncated; for SDXL
        (len(prompts), 2 * max_length): the first tokenizer's ids, then the second's."""
        ids = tokenize(self.tokenizer, prompts)
        if not self.is_sdxl:
            return ids
        return np.concatenate([ids, tokenize(self.tokenizer_2, prompts)[:, : ids.shape[1]]], axis=1)

    def with_attention(self, attention: str) -> StableDiffusion:
        """Returns this model with every attention layer (UNet, VAE, text encoder) computed by
        `attention`: "xla", "cudnn" (fused, CUDA GPUs) or "auto" (picks per backend and logs why)."""
        _check_attention(attention)
        return dataclasses.replace(
            self, unet=self.unet.clone(attention=attention), vae=self.vae.clone(attention=attention),
            text_encoder=self.text_encoder.clone(attention=attention),
        )

    def logical_axes(self) -> StableDiffusionParams:
        """Returns each component's tree of logical PartitionSpecs ("embed", "conv_out", ...), the
        names `sharding.param_shardings` maps onto a mesh. Computed abstractly (no weights)."""
        return _logical_axes(self.unet, self.vae, self.text_encoder)

    def encode_text(self, text_params: Params, input_ids: jax.Array) -> jax.Array:
        """Returns the UNet's text conditioning of token ids (`tokenize`): the text encoder's last
        hidden states (B, L, D), the cross-attention context; for SDXL the packed (B, L + 1, D1 + D2)
        of nn.clip.SdxlTextEncoders (penultimate states of both encoders, then the pooled embedding)."""
        if self.is_sdxl:
            return self.text_encoder.apply({"params": text_params}, input_ids)
        return self.text_encoder.apply({"params": text_params}, input_ids).last_hidden_state

    def unet_inputs(self, latents, context) -> tuple[jax.Array, dict | None]:
        """Returns (cross-attention context, added conditions or None) of a text conditioning for
        NCHW `latents`: for SDXL the pooled embedding and the time ids of an uncropped image of the
        latents' size (original = target = (H, W), crop (0, 0)), as diffusers' pipeline passes them."""
        if not self.is_sdxl:
            return context, None
        context, pooled = nn_clip.split_sdxl_conditioning(context, self.text_encoder.pooled_width)
        height, width = (size * self.vae_scale_factor for size in latents.shape[2:])
        time_ids = jnp.broadcast_to(jnp.asarray([height, width, 0, 0, height, width], jnp.float32),
                                    (latents.shape[0], SDXL_TIME_IDS))
        return context, {"text_embeds": pooled, "time_ids": time_ids}

    def apply_unet(
        self,
        unet_params: Params,
        latents,
        timesteps,
        context,
        train: bool = False,
        remat: bool | str = False,
        capture_attention: bool | Sequence[str] = False,
    ):
        """Returns the UNet's prediction (epsilon, v or x0) for NCHW latents.

        `remat` (a policy of nn.layers.REMAT_POLICIES, or True for "block") recomputes every
        resnet and transformer block in the backward pass instead of storing what the policy does
        not save (SD UNets have no dropout, so `train` changes nothing and is kept for callers that
        say which pass they run). With `capture_attention` (True: every cross-attention layer, or
        their diffusers names) returns (prediction, {layer name: probabilities (B, heads, pixels,
        tokens)}), the prediction unchanged.
        """
        del train
        policy = nn_layers.remat_policy(remat)
        unet = self.unet.clone(remat=policy) if policy != "none" and self.unet.remat == "none" else self.unet
        context, added = self.unet_inputs(latents, context)
        if not capture_attention:
            return unet.apply({"params": unet_params}, latents, timesteps, context, added)
        prediction, state = unet.apply({"params": unet_params}, latents, timesteps, context, added,
                                       capture_attention=capture_attention, mutable=["intermediates"])
        return prediction, nn_unet.captured_attention(state)

    def encode_images(self, vae_params: Params, pixels: jax.Array, key: jax.Array) -> jax.Array:
        """Returns scaled NCHW latents sampled from the VAE posterior of NHWC pixels in [-1, 1]."""
        latents = self._posterior(vae_params, pixels).sample(key)  # NHWC
        return jnp.transpose(latents, (0, 3, 1, 2)) * self.latent_scale

    def encode_posterior(self, vae_params: Params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the VAE posterior's (mean, std) of NHWC pixels in [-1, 1], scaled NCHW float32.

        mean + std * eps, eps ~ N(0, I), is distributed as `encode_images`; keeping the
        (deterministic) encoder apart from the sampling lets fixed images be encoded once.
        """
        posterior = self._posterior(vae_params, pixels)

        def scaled_nchw(x):
            return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32) * self.latent_scale

        return scaled_nchw(posterior.mean), scaled_nchw(posterior.std)

    def _posterior(self, vae_params: Params, pixels: jax.Array) -> nn_vae.DiagonalGaussian:
        """Returns the VAE's diagonal Gaussian posterior (NHWC) of NHWC pixels."""
        return self.vae.apply({"params": vae_params}, pixels, method=nn_vae.AutoencoderKL.encode)

    def decode_latents(self, vae_params: Params, latents: jax.Array) -> jax.Array:
        """Returns NHWC images in [-1, 1] (unclipped) decoded from scaled NCHW latents."""
        latents = jnp.transpose(latents, (0, 2, 3, 1)) / self.latent_scale
        return self.vae.apply({"params": vae_params}, latents, method=nn_vae.AutoencoderKL.decode)


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
    """A CLIP model for scoring: module, tokenizer and image preprocessing constants (no weights)."""

    path: Path
    model: nn_clip.ClipModel
    tokenizer: CLIPTokenizer
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Returns int32 token ids (len(prompts), max_length), padded and truncated."""
        return tokenize(self.tokenizer, prompts)

    def with_attention(self, attention: str) -> ClipModel:
        """Returns this model with both towers' attention computed by `attention` (see
        StableDiffusion.with_attention)."""
        _check_attention(attention)
        return dataclasses.replace(self, model=self.model.clone(attention=attention))

    def image_features(self, params: Params, pixel_values: jax.Array) -> jax.Array:
        """Returns projected (unnormalised) image embeddings of NCHW preprocessed pixels."""
        return self.model.apply({"params": params}, pixel_values, method=nn_clip.ClipModel.image_features)

    def text_features(self, params: Params, input_ids: jax.Array) -> jax.Array:
        """Returns projected (unnormalised) text embeddings of token ids."""
        return self.model.apply({"params": params}, input_ids, method=nn_clip.ClipModel.text_features)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StableDiffusionParams:
    """The weights of a Stable Diffusion model, one tree per component."""

    unet: Params
    vae: Params
    text_encoder: Params


def _check_attention(attention: str) -> None:
    if attention not in nn_layers.ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={attention!r}: expected one of {', '.join(nn_layers.ATTENTION_IMPLEMENTATIONS)}"
        )


@functools.lru_cache(maxsize=8)
def _logical_axes(unet, vae, text_encoder) -> StableDiffusionParams:
    return StableDiffusionParams(
        unet=nn_unet.logical_partition_specs(unet),
        vae=nn_vae.logical_partition_specs(vae),
        text_encoder=nn_clip.logical_partition_specs(text_encoder),
    )


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Returns int32 ids (n, model_max_length) of `prompts`, padded to and truncated at the limit."""
    if isinstance(prompts, str):
        raise TypeError("tokenize takes a sequence of prompts, not a single string")
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="np",
    ).input_ids
    return ids.astype(np.int32)


def cast_params(params: Params, dtype) -> Params:
    """Returns `params` with floating leaves cast to `dtype`."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, params)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_stable_diffusion(
    path: str | Path,
    *,
    param_dtype="float32",
    compute_dtype="float32",
    attention: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
    allow_bin: bool = False,
) -> tuple[StableDiffusion, StableDiffusionParams]:
    """Returns the static model and its weights from a diffusers-layout Stable Diffusion folder;
    `attention` as StableDiffusion.with_attention takes it.

    Weights are read in `param_dtype`; PyTorch `.bin` files (pickles, read with torch) only with
    `allow_bin`. With a `mesh`, every array is read straight onto its
    sharding (its params' logical axes mapped by `rules`, as the trainer lays them out): each
    process reads only its own shards' bytes. Without one they land on the default device.
    """
    _check_attention(attention)
    path = _existing_dir(path)
    _check_sd_layout(path)
    target = _Target(jnp.dtype(compute_dtype), jnp.dtype(param_dtype), mesh, rules, allow_bin)
    unet, unet_params = _load_diffusers_model(_UNET, path / "unet", target)
    vae, vae_params = _load_diffusers_model(_VAE, path / "vae", target)
    sdxl = {}
    if unet.config.addition_embed_type == "text_time":
        text_encoder, text_params, sdxl = _load_sdxl_text_encoders(path, unet.config, target)
    else:
        text_encoder, text_params = _load_clip_family(path / "text_encoder", target)
    sd = StableDiffusion(
        path=path,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(path / "tokenizer"),
        scheduler_config=_read_json(_require_file(path / "scheduler", "scheduler_config.json")),
        **sdxl,
    )
    params = StableDiffusionParams(unet=unet_params, vae=vae_params, text_encoder=text_params)
    return sd.with_attention(attention), params


def load_clip(
    path: str | Path,
    *,
    param_dtype="float32",
    attention: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES,
    allow_bin: bool = False,
) -> tuple[ClipModel, Params]:
    """Returns the static CLIP model and its weights from a transformers-layout CLIPModel folder;
    `attention` as ClipModel.with_attention takes it; `param_dtype`, `mesh`, `rules` and
    `allow_bin` as `load_stable_diffusion` takes them."""
    _check_attention(attention)
    path = _existing_dir(path)
    if (path / "model_index.json").exists() or (path / "unet").is_dir():
        raise ModelLoadError(
            f"{path}: this is a Stable Diffusion pipeline folder (it has model_index.json/unet/); "
            "a CLIP scoring model must be a transformers CLIPModel folder (config.json with "
            "model_type 'clip', weights, tokenizer and preprocessor_config.json)."
        )
    config = _read_json(_require_file(path, "config.json"))
    if config.get("model_type") != "clip":
        raise ModelLoadError(
            f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'clip' "
            "(a transformers CLIPModel with both text and vision towers)."
        )
    model, params = _load_clip_family(
        path, _Target(jnp.dtype(jnp.float32), jnp.dtype(param_dtype), mesh, rules, allow_bin)
    )
    image_size, mean, std = _read_clip_preprocessing(path, model.config.vision.image_size)
    clip = ClipModel(
        path=path,
        model=model,
        tokenizer=_load_tokenizer(path),
        image_size=image_size,
        image_mean=mean,
        image_std=std,
    )
    return clip.with_attention(attention), params


def _existing_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model folder does not exist or is not a directory.")
    return path


def _require_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise ModelLoadError(f"{folder}: missing {name}.")
    return file


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{file}: not readable JSON ({err}).") from err


def _check_sd_layout(path: Path) -> None:
    missing = [name for name in SD_COMPONENTS if not (path / name).is_dir()]
    if not missing:
        return
    config = path / "config.json"
    if config.is_file() and "clip" in config.read_text(errors="replace").lower():
        raise ModelLoadError(
            f"{path}: this looks like a CLIP model folder (transformers layout), not a Stable "
            f"Diffusion folder; expected the diffusers layout with {', '.join(SD_COMPONENTS)}/."
        )
    raise ModelLoadError(
        f"{path}: not a Stable Diffusion folder in the diffusers layout: missing "
        f"{', '.join(m + '/' for m in missing)} (expected {', '.join(SD_COMPONENTS)}/ and model_index.json)."
    )


def _find_weights(folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        for candidate in (folder / name, _variant(folder / name, "fp16")):
            if candidate.is_file():
                return candidate
    raise ModelLoadError(f"{folder}: no weights found (looked for {', '.join(names)}).")


def _variant(file: Path, variant: str) -> Path:
    return file.with_name(f"{file.stem}.{variant}{file.suffix}")


@dataclasses.dataclass(frozen=True)
class _Target:
    """What loaded modules compute in, and where and in which dtype their weights go."""

    compute_dtype: jnp.dtype
    param_dtype: jnp.dtype
    mesh: jax.sharding.Mesh | None = None
    rules: sharding.LogicalRules = sharding.DEFAULT_LOGICAL_RULES
    allow_bin: bool = False  # read PyTorch .bin (pickle) weights when no safetensors are there

    def shardings(self, family, module) -> Params | None:
        """Returns the shardings of `module`'s params on the mesh (None without one); `family` is
        the gal_jax.nn module defining it (abstract_params, logical_partition_specs)."""
        if self.mesh is None:
            return None
        return sharding.param_shardings(
            family.abstract_params(module), self.mesh, family.logical_partition_specs(module), self.rules
        )


@dataclasses.dataclass(frozen=True)
class _DiffusersFamily:
    """How to build and load one of our diffusers model families."""

    family: Any  # the gal_jax.nn module: CLASS_NAME, read_config, load_params, abstract_params, ...
    build: Callable[[Any, Any, Any], Any]  # (config, compute dtype, param dtype) -> module


_UNET = _DiffusersFamily(
    nn_unet, lambda config, dtype, param_dtype: nn_unet.UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype)
)
# NHWC: the facade's images are NHWC, and latents are transposed once, at the UNet's boundary.
_VAE = _DiffusersFamily(
    nn_vae,
    lambda config, dtype, param_dtype: nn_vae.AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype, layout="NHWC"),
)


def _load_diffusers_model(family: _DiffusersFamily, folder: Path, target: _Target):
    """Returns (module, params in the target's dtype and shardings) of a diffusers model folder."""
    config_file = _require_file(folder, "config.json")
    try:
        module = family.build(family.family.read_config(config_file), target.compute_dtype, target.param_dtype)
    except ValueError as err:  # wrong _class_name, unsupported options: the message names the file
        message = str(err)
        raise ModelLoadError(message if str(config_file) in message else f"{config_file}: {message}") from err
    weights_file = _find_weights(folder, DIFFUSERS_WEIGHTS)
    if weights_file.suffix == ".msgpack":
        raise ModelLoadError(
            f"{weights_file}: Flax msgpack weights are not read any more; save the model with "
            "diffusers' save_pretrained(..., safe_serialization=True) to get "
            "diffusion_pytorch_model.safetensors."
        )
    with contextlib.ExitStack() as stack:
        if weights_file.suffix == ".bin":
            _check_bin_allowed(weights_file, target)
            weights_file = _bin_as_safetensors(weights_file, stack, "diffusion_pytorch_model.safetensors")
        return module, _read_params(family.family, module, weights_file, target)


def _read_params(family, module, weights_file: Path, target: _Target) -> Params:
    """Returns family.load_params(module, weights_file) on the target's shardings, its errors as
    ModelLoadError naming the file."""
    try:
        return family.load_params(module, weights_file, shardings=target.shardings(family, module))
    except ValueError as err:
        message = str(err)
        raise ModelLoadError(message if str(weights_file) in message else f"{weights_file}: {message}") from err
    except Exception as err:  # safetensors raises several unrelated types for damaged files
        raise ModelLoadError(
            f"{weights_file}: unreadable or truncated weights file ({type(err).__name__}: {err})."
        ) from err


def _load_clip_family(folder: Path, target: _Target):
    """Returns (our CLIP module, params) of a transformers CLIPModel / CLIPTextModel folder.

    Weights: `model.safetensors` (or its index, or the fp16 variant); a `pytorch_model.bin` is read
    with PyTorch and converted through a temporary safetensors file.
    """
    config_file = _require_file(folder, "config.json")
    try:
        config = nn_clip.read_config(config_file)
    except ValueError as err:
        raise ModelLoadError(str(err)) from err
    weights_file = _find_weights(folder, TRANSFORMERS_WEIGHTS)
    if weights_file.suffix == ".msgpack":
        raise ModelLoadError(
            f"{weights_file}: Flax msgpack weights are not read any more; save the model with "
            "transformers' save_pretrained(..., safe_serialization=True) to get model.safetensors."
        )
    with contextlib.ExitStack() as stack:
        if weights_file.suffix == ".bin":
            _check_bin_allowed(weights_file, target)
            weights_file = _bin_as_safetensors(weights_file, stack)
        dtypes = dict(dtype=target.compute_dtype, param_dtype=target.param_dtype)
        if isinstance(config, nn_clip.ClipConfig):
            model = nn_clip.ClipModel(config, **dtypes)
        else:
            stored = nn_clip.weight_files(weights_file)
            model = nn_clip.ClipTextModel(config, "text_projection.weight" in stored, **dtypes)
        return model, _read_params(nn_clip, model, weights_file, target)


def _load_sdxl_text_encoders(path: Path, unet_config: nn_unet.UNetConfig, target: _Target):
    """Returns (SdxlTextEncoders, their params, the SDXL fields of StableDiffusion) of an SDXL
    pipeline folder, checking the encoders fit its UNet (context width, pooled width, time ids)."""
    missing = [name for name in SDXL_COMPONENTS if not (path / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path}: its UNet has SDXL's text_time embedding, but {', '.join(m + '/' for m in missing)} "
            "(SDXL's second text encoder and tokenizer) is missing; only SDXL base pipelines are read "
            "(a refiner, with one text encoder, is not supported)."
        )
    towers = [_load_clip_family(path / name, target) for name in nn_clip.SDXL_TEXT_ENCODERS]
    (first, first_params), (second, second_params) = towers
    for model, name in ((first, "text_encoder"), (second, "text_encoder_2")):
        if not isinstance(model, nn_clip.ClipTextModel):
            raise ModelLoadError(f"{path / name}: expected a CLIP text model, found a {type(model).__name__}.")
    if not second.projection:
        raise ModelLoadError(f"{path / 'text_encoder_2'}: SDXL's second text encoder must be a "
                             "CLIPTextModelWithProjection (its weights have no text_projection.weight).")
    try:
        encoders = nn_clip.SdxlTextEncoders(first.config, second.config, dtype=target.compute_dtype,
                                            param_dtype=target.param_dtype)
    except ValueError as err:
        raise ModelLoadError(f"{path}: {err}") from err
    time_width = SDXL_TIME_IDS * unet_config.addition_time_embed_dim
    problems = []
    if unet_config.cross_attention_dim != encoders.context_width:
        problems.append(f"cross_attention_dim {unet_config.cross_attention_dim} is not the text encoders' "
                        f"{first.config.hidden_size} + {second.config.hidden_size} hidden features")
    if unet_config.projection_class_embeddings_input_dim != encoders.pooled_width + time_width:
        problems.append(f"projection_class_embeddings_input_dim {unet_config.projection_class_embeddings_input_dim} "
                        f"is not text_encoder_2's projection_dim {encoders.pooled_width} + {SDXL_TIME_IDS} time ids "
                        f"x addition_time_embed_dim {unet_config.addition_time_embed_dim}")
    if problems:
        raise ModelLoadError(f"{path / 'unet' / 'config.json'}: does not fit the pipeline's text encoders: "
                             + "; ".join(problems) + ".")
    index_file = path / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    fields = dict(tokenizer_2=_load_tokenizer(path / "tokenizer_2"),
                  empty_prompt_is_zero=bool(index.get("force_zeros_for_empty_prompt", True)))
    params = dict(zip(nn_clip.SDXL_TEXT_ENCODERS, (first_params, second_params)))
    return encoders, params, fields


def _check_bin_allowed(file: Path, target: _Target) -> None:
    if not target.allow_bin:
        raise ModelLoadError(
            f"{file}: PyTorch .bin weights are a pickle and are read only when asked for: pass "
            "allow_bin=True (--config.model.allow_bin=True; needs PyTorch), or save the model with "
            "save_pretrained(..., safe_serialization=True) to get safetensors."
        )


def _bin_as_safetensors(file: Path, stack: contextlib.ExitStack, name: str = "model.safetensors") -> Path:
    """Returns a temporary safetensors copy (removed when `stack` closes) of a PyTorch .bin file."""
    from safetensors.numpy import save_file

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gal-jax-bin-")))
    tensors = {k: np.ascontiguousarray(v) for k, v in _read_torch_weights(file).items()}
    save_file(tensors, str(folder / name))
    return folder / name


def _read_torch_weights(file: Path) -> dict[str, np.ndarray]:
    """Returns a PyTorch state dict as numpy arrays (safetensors without torch; .bin with torch)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(file))
        import torch

        state = torch.load(str(file), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
    except ModuleNotFoundError as err:
        raise ModelLoadError(f"{file}: reading .bin weights needs PyTorch ({err}).") from err
    except Exception as err:  # safetensors/torch raise several unrelated types for bad files
        raise ModelLoadError(f"{file}: unreadable or truncated weights file ({type(err).__name__}: {err}).") from err


def tokenizer_class() -> type[CLIPTokenizer]:
    """Returns transformers' CLIPTokenizer, imported on first use: transformers (the tokenizer is all
    we take from it) imports PyTorch where installed, seconds that a usage error need not wait."""
    # Its import-time advice (no PyTorch, no TensorFlow) is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers.CLIPTokenizer


def _load_tokenizer(folder: Path) -> CLIPTokenizer:
    for name in ("vocab.json", "merges.txt"):
        _require_file(folder, name)
    try:
        return tokenizer_class().from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{folder}: not a loadable CLIP tokenizer ({err}).") from err


def _read_clip_preprocessing(path: Path, default_size: int):
    """Returns (crop size, mean, std) from preprocessor_config.json, CLIP defaults when absent."""
    file = path / "preprocessor_config.json"
    config = _read_json(file) if file.is_file() else {}
    crop = config.get("crop_size", default_size)
    size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
    mean = tuple(config.get("image_mean", CLIP_MEAN))
    std = tuple(config.get("image_std", CLIP_STD))
    return int(size), mean, std


def load_unet_params(
    folder: str | Path, *, compute_dtype="float32", param_dtype="float32", allow_bin: bool = False
) -> Params:
    """Returns the Flax params of the diffusers UNet2DConditionModel folder (config.json + weights).

    Weights stored in another float dtype (e.g. a float16 export) are cast to `param_dtype`.
    """
    folder = _existing_dir(folder)
    target = _Target(jnp.dtype(compute_dtype), jnp.dtype(param_dtype), allow_bin=allow_bin)
    _, params = _load_diffusers_model(_UNET, folder, target)
    return params


# ---------------------------------------------------------------------------------------------
# Random-weight models of real sizes (benchmarks: no download needed)
# ---------------------------------------------------------------------------------------------

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_B32_TEXT = dict(SD15_TEXT, hidden_size=512, intermediate_size=2048, num_attention_heads=8, projection_dim=512)
CLIP_B32_VISION = dict(
    image_size=224,
    patch_size=32,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=512,
)
# SDXL base 1.0: no attention at the first level, 2 and 10 transformer blocks deeper down, CLIP ViT-L
# and OpenCLIP ViT-bigG text towers (penultimate states 768 + 1280 wide, bigG's pooled projection 1280),
# six time ids of 256 features.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT_2 = dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")
# The architectures `random_stable_diffusion(size=...)` builds: (unet, vae, text, second text or None).
MODEL_SIZES = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT, None),
    "sdxl": (SDXL_UNET, SDXL_VAE, SD15_TEXT, SDXL_TEXT_2),
}


def random_stable_diffusion(
    tokenizer_dir: Path,
    scheduler_config: dict,
    *,
    unet_config: dict = SD15_UNET,
    vae_config: dict = SD15_VAE,
    text_config: dict = SD15_TEXT,
    text_config_2: dict | None = None,
    seed: int = 0,
    param_dtype="float32",
    compute_dtype="float32",
    abstract: bool = False,
) -> tuple[StableDiffusion, StableDiffusionParams]:
    """Returns an SD model of the given architecture (SD 1.5 by default; an SDXL one with
    `text_config_2`, the second text encoder, see MODEL_SIZES) with random weights;
    `abstract=True` gives their shapes and dtypes only (ShapeDtypeStructs, nothing allocated)."""
    compute_dtype = jnp.dtype(compute_dtype)
    unet = _UNET.build(nn_unet.UNetConfig.from_dict(unet_config), compute_dtype, jnp.float32)
    vae = _VAE.build(nn_vae.VaeConfig.from_dict(vae_config), compute_dtype, jnp.float32)
    text = nn_clip.ClipTextConfig.from_dict(text_config)
    if text_config_2 is None:
        text_encoder = nn_clip.ClipTextModel(text, dtype=compute_dtype)
    else:
        text_encoder = nn_clip.SdxlTextEncoders(text, nn_clip.ClipTextConfig.from_dict(text_config_2),
                                                dtype=compute_dtype)

    def init(key):
        keys = jax.random.split(key, 3)
        return cast_params(StableDiffusionParams(
            unet=nn_unet.init_params(unet, keys[0]),
            vae=nn_vae.init_params(vae, keys[1]),
            text_encoder=nn_clip.init_params(text_encoder, keys[2]),
        ), param_dtype)

    tokenizer = _load_tokenizer(Path(tokenizer_dir))
    sd = StableDiffusion(
        path=Path(f"random:{unet_config['block_out_channels']}"),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=dict(scheduler_config),
        tokenizer_2=None if text_config_2 is None else tokenizer,
        empty_prompt_is_zero=text_config_2 is not None,
    )
    return sd, (jax.eval_shape(init, jax.random.key(seed)) if abstract else init(jax.random.key(seed)))


def random_clip(tokenizer_dir: Path, *, seed: int = 0) -> tuple[ClipModel, Params]:
    """Returns a CLIP ViT-B/32-sized model with random weights."""
    config = nn_clip.ClipConfig.from_dict(
        dict(text_config=CLIP_B32_TEXT, vision_config=CLIP_B32_VISION, projection_dim=512))
    model = nn_clip.ClipModel(config)
    params = nn_clip.init_params(model, jax.random.key(seed))
    clip = ClipModel(
        path=Path("random:clip-b32"),
        model=model,
        tokenizer=_load_tokenizer(Path(tokenizer_dir)),
        image_size=224,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return clip, params
