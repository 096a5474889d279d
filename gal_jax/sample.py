"""Generation over a grid of (prompt, seed) pairs: one compiled function, vmapped and sharded.

Per call, a `Generator` encodes every prompt once (and the empty prompt for classifier-free
guidance), then generates the grid in fixed-size chunks: each chunk is one compiled function that
draws the initial noise, runs the whole denoising loop (`schedulers.sample_loop`, a `lax.scan`)
vmapped over images, decodes with the VAE and returns uint8 images, sharded over the mesh's batch
axes. The last chunk is padded and the padding dropped, so every round with the same chunk size
reuses one compilation. Chunk k is handed to the caller (`on_chunk`: PNG writing) only once chunk
k+1 is queued, so the host's work on one chunk overlaps the device's work on the next.

Chunk size: `max_images_per_device` bounds the images per device of one chunk; 0 (`AUTO`) chooses
the bound once per Generator from the devices' free memory and the chunk function's compiled
memory (fixed + per image, from XLA's buffer assignment at two sizes), and keeps the first grid's
chunk for every later grid so that a shrinking pool never recompiles. Devices that report no
memory (XLA:CPU) get AUTO_FALLBACK_PER_DEVICE.

Every image has its own key, `image_key(base_seed, round, prompt_id, seed)`, with prompt_id the
prompt's index in the *original* anchor pool: an image depends only on (round, prompt_id, seed),
never on the batch, padding, pool order or device count.

Guidance: `guidance_scale == 1` means no classifier-free guidance (one UNet pass per step, the
conditional prediction); scales below 1 are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gal_jax import io_utils, memory, schedulers, sharding
from gal_jax.models import StableDiffusion, StableDiffusionParams

TEXT_BATCH = 8
MAX_ID = 2**31  # fold_in takes 32-bit data: seeds, rounds and prompt ids must stay below this

AUTO = 0  # max_images_per_device=AUTO: the chunk is chosen from the devices' free memory
AUTO_FALLBACK_PER_DEVICE = 8  # where devices report no memory statistics (XLA:CPU)
AUTO_MAX_PER_DEVICE = 64  # past this a chunk gains little throughput and delays the first PNGs
AUTO_FREE_FRACTION = 0.85  # of the free bytes: headroom for fragmentation and what the host adds later
AUTO_PROBES = (2, 4)  # images per device of the two chunks compiled to split memory into fixed + per image


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the tokenizer limit and was truncated."""


def check_prompts(tokenizer, prompts: Sequence[str], what: str, *, allow_empty: bool = False) -> None:
    """Raises ValueError for a bad prompt list; warns (PromptTruncatedWarning) for over-long prompts."""
    if isinstance(prompts, str):
        raise ValueError(f"{what}: expected a sequence of prompts, got the single string {prompts!r}")
    if not prompts and not allow_empty:
        raise ValueError(f"{what}: the prompt list is empty")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what}: prompts must be strings, got {bad[0]!r}")
    limit = tokenizer.model_max_length
    for prompt in dict.fromkeys(prompts):
        length = len(tokenizer(prompt, truncation=False).input_ids)
        if length > limit:
            warnings.warn(
                f"{what}: prompt of {length} tokens is truncated to the tokenizer limit of {limit}: "
                f"{prompt[:60]!r}...",
                PromptTruncatedWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def image_key(base_seed, round_index, prompt_id, seed_index) -> jax.Array:
    """Returns the PRNG key of one image: fold_in(fold_in(fold_in(key(base_seed), round), prompt), seed)."""
    key = jax.random.key(base_seed)
    for data in (round_index, prompt_id, seed_index):
        key = jax.random.fold_in(key, data)
    return key


def guided_prediction(sd: StableDiffusion, unet_params, latents, t, context, uncond, guidance_scale: float):
    """Returns the classifier-free-guided UNet prediction (float32) for one image's CHW latents."""
    x = latents[None].astype(jnp.float32)
    if guidance_scale == 1.0:
        return sd.apply_unet(unet_params, x, jnp.full((1,), t), context[None])[0].astype(jnp.float32)
    out = sd.apply_unet(
        unet_params, jnp.concatenate([x, x]), jnp.full((2,), t), jnp.stack([uncond, context])
    ).astype(jnp.float32)
    return out[0] + guidance_scale * (out[1] - out[0])


def denoise(sd, sampler, guidance_scale, unet_params, latents, context, uncond, key, mean_shift=None) -> jax.Array:
    """Returns the final CHW latents of one image denoised from initial noise `latents` (shifted by
    `mean_shift`, CHW, when given)."""
    model_fn = functools.partial(
        guided_prediction, sd, unet_params, context=context, uncond=uncond, guidance_scale=guidance_scale
    )
    return schedulers.sample_loop(sampler, model_fn, latents, key, mean_shift)


def to_uint8(images: jax.Array) -> jax.Array:
    """Returns uint8 images from [-1, 1] floats, rounded as diffusers' numpy_to_pil does."""
    return jnp.round(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


def generate_images(sd, sampler, guidance_scale, unet_params, vae_params, context, uncond, keys, init=None):
    """Returns uint8 NHWC images, one per (context, key) row: noise, denoising loop, VAE decode.

    `init` = (uint8 NHWC images, gamma): MuDI's initialisation, each row's noise shifted by gamma
    times the VAE latents (posterior mean) of its image.
    """
    size = sd.resolution // sd.vae_scale_factor
    latent_shape = (sd.latent_channels, size, size)
    shifts = None
    if init is not None:
        images, gamma = init
        mean, _ = sd.encode_posterior(vae_params, images.astype(jnp.float32) / 127.5 - 1.0)
        shifts = gamma * mean

    def one(context, key, shift):
        noise_key, loop_key = jax.random.split(key)
        latents = jax.random.normal(noise_key, latent_shape, jnp.float32)
        return denoise(sd, sampler, guidance_scale, unet_params, latents, context, uncond, loop_key, shift)

    latents = jax.vmap(one)(context, keys, shifts)
    return to_uint8(sd.decode_latents(vae_params, latents))


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def check_guidance(guidance_scale: float, where: str = "") -> None:
    """Raises ValueError unless the guidance scale works; `where` prefixes its name (e.g. 'config.sample.')."""
    if guidance_scale < 1.0:
        raise ValueError(f"{where}guidance_scale={guidance_scale} must be >= 1 (1 means no classifier-free guidance)")


def check_chunk_bound(max_images_per_device: int, where: str = "") -> None:
    """Raises ValueError unless the chunk bound works (>= 1, or AUTO); `where` prefixes its name."""
    if max_images_per_device < 0:
        raise ValueError(f"{where}max_images_per_device={max_images_per_device} must be >= 1, or 0 (auto)")


class Generator:
    """Generates grids of (prompt, seed) images on a mesh; compiled functions are built once per run.

    A grid of G images runs in chunks of `chunk_size(G)` images (at most `max_images_per_device`
    per device; 0 chooses it from free memory, see the module docstring); chunks of the same size
    reuse one compilation across calls and rounds. `traces` counts how often the chunk function
    was traced.
    """

    def __init__(self, sd: StableDiffusion, mesh: Mesh, *, sampler: str = "ddpm", steps: int = 50,
                 guidance_scale: float = 7.5, max_images_per_device: int = 8):
        check_guidance(guidance_scale)
        check_chunk_bound(max_images_per_device)
        self.sd = sd
        self.mesh = mesh
        self.sampler = schedulers.make_sampler(sampler, sd.scheduler_config, steps)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.max_images_per_device = int(max_images_per_device)
        self.traces = 0
        self._auto_per_device: int | None = None  # AUTO's choice, made at the first chunk_size with params
        self._chunk_fn = jax.jit(self._chunk, out_shardings=sharding.batch_sharding(mesh))
        # The same function without the trace count: compiled only to read its memory (AUTO).
        self._probe_fn = jax.jit(self._chunk_images, out_shardings=sharding.batch_sharding(mesh))
        self._encode = jax.jit(sd.encode_text, out_shardings=sharding.replicated(mesh))
        # Uneven shardings are not allowed: a grid that does not divide over the shards is replicated.
        self._concat = {
            divisible: jax.jit(concat_rows, static_argnums=1, out_shardings=out)
            for divisible, out in ((True, sharding.batch_sharding(mesh)), (False, sharding.replicated(mesh)))
        }

    @classmethod
    def from_config(cls, config, sd: StableDiffusion, mesh: Mesh, section: str = "sample") -> "Generator":
        """Returns a Generator with the sampler, steps and guidance of config.<section> ('sample' for
        the GAL loop, 'eval' for evaluation) and the chunk bound of config.sample."""
        settings = config[section]
        return cls(
            sd,
            mesh,
            sampler=settings.sampler,
            steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            max_images_per_device=config.sample.max_images_per_device,
        )

    @property
    def settings(self) -> dict:
        """Returns the sampling protocol: sampler name, steps and guidance scale."""
        return {"sampler": self.sampler.name, "steps": self.steps, "guidance_scale": self.guidance_scale}

    @property
    def num_shards(self) -> int:
        return sharding.num_batch_shards(self.mesh)

    def chunk_size(self, num_images: int | None, params: StableDiffusionParams | None = None, *,
                   with_init: bool = False) -> int:
        """Returns the images per compiled call for a grid of `num_images` (None: no grid, the
        largest chunk), a multiple of the shards.

        A fixed bound gives min(bound, the grid per device) per device. AUTO chooses once, at the
        first call, from `params` (arrays or ShapeDtypeStructs; `with_init`: chunks that take
        MuDI's initial images) and returns that size for every later grid.
        """
        if self.max_images_per_device != AUTO:
            per_device = self.max_images_per_device
            if num_images is not None:
                per_device = min(per_device, -(-num_images // self.num_shards))
            return max(per_device, 1) * self.num_shards
        if self._auto_per_device is None:
            if params is None:
                raise ValueError("max_images_per_device=0 (auto) chooses the chunk from the model: pass its params")
            self._auto_per_device = self._choose_per_device(params, num_images, with_init)
        return self._auto_per_device * self.num_shards

    def _choose_per_device(self, params, num_images: int | None, with_init: bool) -> int:
        """Returns AUTO's images per device: as many as fit in AUTO_FREE_FRACTION of the free
        memory (at most AUTO_MAX_PER_DEVICE), spread evenly over the grid's chunks; logs why."""
        free = memory.free_bytes(self.mesh.devices.flat)
        if free is None:
            bound = AUTO_FALLBACK_PER_DEVICE
            why = (f"{self.mesh.devices.flat[0].platform} devices report no free memory: the default bound of "
                   f"{AUTO_FALLBACK_PER_DEVICE}")
        else:
            need = self.chunk_memory(params, with_init)
            fitting = need.most_items(int(free * AUTO_FREE_FRACTION))
            bound = min(max(fitting, 1), AUTO_MAX_PER_DEVICE)
            why = (f"{need.per_item / 2**20:.1f} MiB/image + {need.fixed / 2**20:.0f} MiB, "
                   f"{free / 2**30:.1f} GiB free" + ("; not even one image fits" if fitting < 1 else ""))
        per_device = bound
        if num_images is not None:  # equal chunks: 180 images at a bound of 64 run as 3 x 60, not 3 x 64
            grid = -(-num_images // self.num_shards)
            per_device = -(-grid // -(-grid // bound))
        if jax.process_index() == 0:
            tqdm.write(f"generation chunk: {per_device} images/device (auto: {why})")
        return per_device

    def chunk_memory(self, params: StableDiffusionParams, with_init: bool = False) -> memory.LinearNeed:
        """Returns one device's bytes for a chunk beyond its resident weights, as fixed + per
        image, from the chunk function compiled (never run) for AUTO_PROBES images per device."""
        needs = [memory.of_compiled(self._lower(self._probe_fn, params, n * self.num_shards, with_init).compile())
                 for n in AUTO_PROBES]
        return memory.linear_need(*needs, items=AUTO_PROBES)

    def _chunk_images(self, unet_params, vae_params, context, uncond, base_seed, round_index, prompt_ids, seeds,
                      init=None):
        keys = jax.vmap(image_key, in_axes=(None, None, 0, 0))(base_seed, round_index, prompt_ids, seeds)
        return generate_images(
            self.sd, self.sampler, self.guidance_scale, unet_params, vae_params, context, uncond, keys, init
        )

    def _chunk(self, unet_params, vae_params, context, *args):
        self.traces += 1
        if jax.process_index() == 0:  # runs while jit traces: once per chunk shape, then XLA compiles
            tqdm.write(f"compiling the sampler ({self.sampler.name}, {self.sampler.num_steps} steps) "
                       f"for chunks of {context.shape[0]} images ...")
        return self._chunk_images(unet_params, vae_params, context, *args)

    def generate(self, params: StableDiffusionParams, prompts: Sequence[str], prompt_ids: Sequence[int],
                 round_index: int, num_per_prompt: int, base_seed: int, progress: bool = True,
                 desc: str = "generate", init_images: np.ndarray | None = None, init_gamma: float = 0.0,
                 on_chunk: Callable[[range, jax.Array], Any] | None = None) -> jax.Array:
        """Returns uint8 images (len(prompts) * num_per_prompt, H, W, 3), image j of prompt i at row
        i * num_per_prompt + j, sharded over the mesh's batch axes (replicated when the count does
        not divide evenly over the shards).

        `init_images` (uint8, one (H, W, 3) image per row of the grid) with `init_gamma` start each
        image from noise shifted by init_gamma times that image's VAE latents (MuDI's
        initialisation from a collage of the subjects); they are encoded in the compiled chunk.

        `on_chunk(rows, images)` is called on this thread for each chunk in order, once the next
        chunk is queued on the device: images[i] is grid row rows[i] (rows past len(rows) are
        padding).
        """
        prompt_ids = _check_grid(prompts, prompt_ids, round_index, num_per_prompt, base_seed)
        check_prompts(self.sd.tokenizer, prompts, "generation")
        if init_images is not None:
            wanted = (len(prompts) * num_per_prompt, self.sd.resolution, self.sd.resolution, 3)
            init_images = np.asarray(init_images)
            if init_images.shape != wanted or init_images.dtype != np.uint8:
                raise ValueError(f"init_images must be uint8 {wanted} (one per image of the grid), "
                                 f"got {init_images.dtype} {init_images.shape}")
        weights = _on_mesh((params.unet, params.vae), self.mesh)
        embeddings = self.text_embeddings(params.text_encoder, [""] + list(prompts))
        uncond = embeddings[0]
        if self.sd.empty_prompt_is_zero:  # SDXL's pipelines guide against zeros (force_zeros_for_empty_prompt)
            uncond = np.zeros_like(uncond)
        grid = _Grid(np.repeat(np.arange(len(prompts)), num_per_prompt), np.tile(np.arange(num_per_prompt), len(prompts)),
                     prompt_ids, embeddings[1:], uncond, base_seed, round_index, init_images, init_gamma)
        total = len(grid.prompt)
        chunk = self.chunk_size(total, params, with_init=init_images is not None)
        chunks = []
        # tqdm's rate column is images/s (unit="img"); blocking per chunk keeps it honest.
        with tqdm(total=total, unit="img", desc=desc, disable=not progress) as bar:
            for rows, images in _one_behind(self._dispatch(weights, grid, chunk)):
                if progress:
                    images.block_until_ready()
                    bar.update(len(rows))
                if on_chunk is not None:
                    on_chunk(rows, images)
                chunks.append(images)
        return self._concat[total % self.num_shards == 0](chunks, total)

    def _dispatch(self, weights: tuple, grid: "_Grid", chunk: int) -> Iterator[tuple[range, jax.Array]]:
        """Yields each chunk's (grid rows, images) as its call is queued (asynchronous dispatch)."""
        total = len(grid.prompt)
        for begin in range(0, total, chunk):
            rows = _padded_rows(begin, chunk, total)
            args = self._chunk_args(grid.context[grid.prompt[rows]], grid.uncond, grid.base_seed, grid.round_index,
                                    grid.prompt_ids[grid.prompt[rows]], grid.seed[rows])
            if grid.init_images is not None:
                args += (self._init_args(grid.init_images[rows], grid.init_gamma),)
            yield range(begin, min(begin + chunk, total)), self._chunk_fn(*weights, *args)

    def text_embeddings(self, text_params: Any, prompts: Sequence[str]) -> np.ndarray:
        """Returns the text encoder's hidden states (len(prompts), L, D) as numpy, TEXT_BATCH at a time."""
        outputs = []
        for begin in range(0, len(prompts), TEXT_BATCH):
            batch = list(prompts[begin : begin + TEXT_BATCH])
            ids = self.sd.tokenize(batch + [""] * (TEXT_BATCH - len(batch)))
            outputs.append(np.asarray(self._encode(text_params, ids))[: len(batch)])
        return np.concatenate(outputs)

    def _chunk_args(self, context, uncond, base_seed, round_index, prompt_ids, seeds) -> tuple:
        """Returns the chunk function's data arguments placed on the mesh (global arrays)."""
        batch, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        scalars = (np.int32(base_seed), np.int32(round_index))
        return (_put(context, batch), _put(uncond, replicated), *(_put(s, replicated) for s in scalars),
                _put(prompt_ids.astype(np.int32), batch), _put(seeds.astype(np.int32), batch))

    def _init_args(self, images: np.ndarray, gamma: float) -> tuple:
        """Returns the chunk's (initial images, gamma) placed on the mesh."""
        return _put(images, sharding.batch_sharding(self.mesh)), _put(np.float32(gamma), sharding.replicated(self.mesh))

    @property
    def chunk_function(self):
        """The jitted chunk function: (unet, vae params, *compiled_chunk's data args) -> images."""
        return self._chunk_fn

    def compiled_chunk(self, params: StableDiffusionParams, num_images: int | None) -> tuple[jax.stages.Compiled, tuple]:
        """Returns (the compiled chunk function for a grid of `num_images` (None: the largest
        chunk), arguments to call it with).

        `compiled(*args)` generates one chunk of `chunk_size(num_images)` images of the empty
        prompt; `compiled.cost_analysis()` gives its FLOPs.
        """
        chunk = self.chunk_size(num_images, params)
        uncond = self.text_embeddings(params.text_encoder, [""])[0]
        ids = np.arange(chunk)
        args = (*_on_mesh((params.unet, params.vae), self.mesh),
                *self._chunk_args(np.broadcast_to(uncond, (chunk, *uncond.shape)), uncond, 0, 0, ids, ids))
        return self._chunk_fn.lower(*args).compile(), args

    def compile_abstract(self, params: StableDiffusionParams, num_images: int | None) -> jax.stages.Compiled:
        """Returns the chunk function for a grid of `num_images` (None: the largest chunk)
        compiled for params given as ShapeDtypeStructs (nothing model-sized allocated, no text
        encoded): for memory and FLOP figures of models that are not loaded."""
        return self._lower(self._chunk_fn, params, self.chunk_size(num_images, params)).compile()

    def _lower(self, function, params: StableDiffusionParams, chunk: int, with_init: bool = False) -> jax.stages.Lowered:
        """Returns `function` (a jitted chunk function) lowered for `chunk` images from abstract
        arguments: the weights laid out as `generate` places them (kept where already on the
        mesh, else replicated), the data batch-sharded."""
        batch, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)

        def placed(x):
            on_mesh = isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == self.mesh
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if on_mesh else replicated)

        text = jax.eval_shape(self.sd.encode_text, params.text_encoder, self.sd.tokenize([""]))
        scalar = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
        ids = jax.ShapeDtypeStruct((chunk,), np.int32, sharding=batch)
        data = (jax.ShapeDtypeStruct((chunk, *text.shape[1:]), text.dtype, sharding=batch),
                jax.ShapeDtypeStruct(text.shape[1:], text.dtype, sharding=replicated), scalar, scalar, ids, ids)
        if with_init:
            size = self.sd.resolution
            data += ((jax.ShapeDtypeStruct((chunk, size, size, 3), np.uint8, sharding=batch),
                      jax.ShapeDtypeStruct((), np.float32, sharding=replicated)),)
        return function.lower(*jax.tree_util.tree_map(placed, (params.unet, params.vae)), *data)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """One generate call's grid on the host: each row's prompt (index into prompts) and seed, the
    prompts' ids and text embeddings, and what every chunk shares."""

    prompt: np.ndarray
    seed: np.ndarray
    prompt_ids: np.ndarray
    context: np.ndarray
    uncond: np.ndarray
    base_seed: int
    round_index: int
    init_images: np.ndarray | None
    init_gamma: float


def _one_behind(items: Iterator) -> Iterator:
    """Yields `items` in order, each only once the next one has been made: with asynchronous
    dispatch the device has chunk k+1 queued while the host handles chunk k."""
    previous, started = None, False
    for item in items:
        if started:
            yield previous
        previous, started = item, True
    if started:
        yield previous


def _put(value, where) -> jax.Array:
    """Returns the host value as a global array with sharding `where` (each device its slice)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, where, lambda index: value[index])


def _check_grid(prompts, prompt_ids, round_index, num_per_prompt, base_seed) -> np.ndarray:
    """Returns prompt_ids as int64 numpy; raises ValueError for an invalid grid request."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("generation: the prompt list is empty (need at least one prompt)")
    ids = np.asarray(list(prompt_ids), dtype=np.int64).reshape(-1)
    if ids.shape[0] != len(prompts):
        raise ValueError(f"generation: {len(prompts)} prompts but {ids.shape[0]} prompt_ids")
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"generation: prompt_ids must be distinct, got {ids.tolist()}")
    if int(num_per_prompt) < 1:
        raise ValueError(f"generation: num_per_prompt={num_per_prompt} must be >= 1")
    for name, value in (("prompt_ids", ids.min()), ("prompt_ids", ids.max()), ("round_index", round_index),
                        ("base_seed", base_seed), ("num_per_prompt", num_per_prompt)):
        if not 0 <= int(value) < MAX_ID:
            raise ValueError(f"generation: {name} value {int(value)} must be in [0, 2**31)")
    return ids


def concat_rows(chunks: list[jax.Array], total: int) -> jax.Array:
    """Returns the chunks concatenated along the batch axis, cut to `total` rows (padding dropped)."""
    return jnp.concatenate(chunks)[:total]


def _padded_rows(begin: int, chunk: int, total: int) -> np.ndarray:
    """Returns the grid rows of one chunk; rows past the grid repeat row 0 (padding, dropped later)."""
    rows = np.arange(begin, begin + chunk)
    return np.where(rows < total, rows, 0)


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Returns `tree` with every leaf not already laid out on `mesh` replicated over it."""
    replicated = sharding.replicated(mesh)

    def place(x):
        placed = isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == mesh
        return x if placed else jax.device_put(x, replicated)

    return jax.tree_util.tree_map(place, tree)


# ---------------------------------------------------------------------------------------------
# Host side: numpy, PNG files
# ---------------------------------------------------------------------------------------------


def rows_to_host(images: jax.Array) -> np.ndarray:
    """Returns a global array as numpy, gathered from every process (a collective: every process
    calls it, in the same order)."""
    if jax.process_count() > 1 and not images.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(images, tiled=True))
    return np.asarray(jax.device_get(images))


def to_host(images: jax.Array, num_per_prompt: int) -> np.ndarray:
    """Returns the generated images as numpy (P, N, H, W, 3), gathered from every process."""
    host = rows_to_host(images)
    if host.shape[0] % num_per_prompt:
        raise ValueError(f"{host.shape[0]} images do not split into groups of num_per_prompt={num_per_prompt}")
    return host.reshape(-1, num_per_prompt, *host.shape[1:])


def write_images(images, prompts: Sequence[str], seeds: Sequence[int], out_dir: str | Path) -> list[dict]:
    """Returns the index [{prompt, seed, path}] after writing each image as PNG and index.json, atomically.

    `images` is (n, H, W, 3) uint8 (numpy or jax); prompts and seeds give each image's prompt and
    seed index; paths in the index are relative to `out_dir`. Only process 0 writes.
    """
    images = np.asarray(jax.device_get(images))
    if not len(images) == len(prompts) == len(seeds):
        raise ValueError(f"write_images: {len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds")
    index = image_index(prompts, seeds)
    io_utils.write_pngs([Path(out_dir) / entry["path"] for entry in index], images)
    if jax.process_index() == 0:
        io_utils.write_json(Path(out_dir) / "index.json", index)
    return index


def image_index(prompts: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    """Returns the index [{prompt, seed, path}] of images written in order (paths images/00000.png, ...)."""
    return [{"prompt": prompt, "seed": int(seed), "path": str(Path("images") / f"{i:05d}.png")}
            for i, (prompt, seed) in enumerate(zip(prompts, seeds))]


def sample_to_dir(config, sd: StableDiffusion, params: StableDiffusionParams, prompts: Sequence[str],
                  num_per_prompt: int, out_dir: str | Path, *, mesh: Mesh | None = None,
                  init_images: np.ndarray | None = None) -> list[dict]:
    """Returns the index after generating `num_per_prompt` images per prompt (round 0, seed
    config.sample.seed; `init_images` with config.sample.init_gamma: MuDI's initialisation) and
    writing them to `out_dir` as `write_images` does, each chunk's PNGs on threads while the next
    chunk generates."""
    mesh = sharding.mesh_from_config(config.mesh) if mesh is None else mesh
    generator = Generator.from_config(config, sd, mesh)
    index = image_index([p for p in prompts for _ in range(num_per_prompt)], list(range(num_per_prompt)) * len(prompts))
    files = [Path(out_dir) / entry["path"] for entry in index]
    with io_utils.PngWriter() as writer:
        def write_chunk(rows: range, chunk) -> None:
            writer.submit(files[rows.start : rows.stop], rows_to_host(chunk)[: len(rows)])

        generator.generate(params, prompts, range(len(prompts)), 0, num_per_prompt, config.sample.seed,
                           init_images=init_images, init_gamma=config.sample.get("init_gamma", 0.0),
                           on_chunk=write_chunk)
    if jax.process_index() == 0:
        io_utils.write_json(Path(out_dir) / "index.json", index)
    return index
