"""CLIP scoring on device: image and text embeddings and the cosine similarities GAL queries with.

Images come straight from the generator (uint8 NHWC device arrays, sharded over the mesh's batch
axes): no PNG round trip. Preprocessing follows transformers' CLIPImageProcessor (resize the
shortest side to the crop size with bicubic filtering, round to uint8 as its PIL path does, center
crop, scale to [0, 1], CLIP mean/std), done with `jax.image.resize` on device; the resize filter
differs slightly from PIL's, so similarities agree with transformers to about 1e-3, not bit for bit.

Embeddings are L2-normalised, so similarities are cosines. Text embeddings are cached per prompt;
images are embedded in a fixed batch (padded), so one compilation serves every call of one image size.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gal_jax import sharding
from gal_jax.models import ClipModel
from gal_jax.sample import check_prompts, concat_rows

TEXT_BATCH = 8


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Returns (height, width) after resizing the shortest side to `shortest_edge` (transformers' rule)."""
    short, long = sorted((height, width))
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def preprocess(images: jax.Array, size: int, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Returns NCHW float32 CLIP pixel values of uint8 NHWC images: resize, center crop, normalise.

    The shortest side is resized to the crop size `size`, as every OpenAI CLIP processor config does
    (shortest_edge == crop_size == 224).
    """
    n, height, width, channels = images.shape
    new_height, new_width = resized_shape(height, width, size)
    pixels = images.astype(jnp.float32)
    if (new_height, new_width) != (height, width):
        pixels = jax.image.resize(pixels, (n, new_height, new_width, channels), "bicubic", antialias=True)
        # CLIPImageProcessor resizes uint8 images through PIL, which rounds and clips the result.
        pixels = jnp.clip(jnp.round(pixels), 0.0, 255.0)
    if new_height < size or new_width < size:
        raise ValueError(f"image of {height}x{width} cannot be center-cropped to {size}x{size}")
    top, left = (new_height - size) // 2, (new_width - size) // 2
    pixels = pixels[:, top : top + size, left : left + size]
    pixels = (pixels / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(pixels, (0, 3, 1, 2))


def l2_normalize(x: jax.Array) -> jax.Array:
    """Returns `x` scaled to unit L2 norm along its last axis (in float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(clip: ClipModel, params: Any, images: jax.Array) -> jax.Array:
    """Returns L2-normalised CLIP embeddings (n, d) of uint8 NHWC images."""
    pixels = preprocess(images, clip.image_size, clip.image_mean, clip.image_std)
    return l2_normalize(clip.image_features(params, pixels))


def embed_texts(clip: ClipModel, params: Any, input_ids: jax.Array) -> jax.Array:
    """Returns L2-normalised CLIP embeddings (n, d) of token ids."""
    return l2_normalize(clip.text_features(params, input_ids))


class Scorer:
    """CLIP embeddings and similarities on a mesh; text embeddings cached per prompt.

    Images are embedded `batch_size` at a time (rounded up to a multiple of the mesh's batch shards,
    the last batch padded), so every call with the same image size reuses one compiled function;
    `image_traces` counts how often it was traced.
    """

    def __init__(self, clip: ClipModel, clip_params: Any, mesh: Mesh, *, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"score batch_size must be >= 1, got {batch_size}")
        shards = sharding.num_batch_shards(mesh)
        self.clip = clip
        self.mesh = mesh
        self.batch_size = -(-batch_size // shards) * shards
        self.params = jax.device_put(clip_params, sharding.replicated(mesh))
        self._text_cache: dict[str, np.ndarray] = {}
        self.image_traces = 0
        replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        self._embed_images = jax.jit(
            self._traced_embed_images,
            in_shardings=(replicated, batch),
            out_shardings=batch,
        )
        self._embed_texts = jax.jit(
            lambda params, ids: embed_texts(clip, params, ids), out_shardings=replicated
        )
        self._pad = jax.jit(_pad_rows, static_argnums=1, out_shardings=batch)
        self._strips = jax.jit(square_strips, static_argnums=1)  # image_embeddings pads and shards
        # Replicated embeddings are readable on every process, and small (n x d floats).
        self._concat = jax.jit(concat_rows, static_argnums=1, out_shardings=replicated)

    def _traced_embed_images(self, params: Any, images: jax.Array) -> jax.Array:
        self.image_traces += 1
        return embed_images(self.clip, params, images)

    def image_embeddings(self, images: jax.Array) -> jax.Array:
        """Returns L2-normalised embeddings (n, d), replicated, of uint8 NHWC images (device or numpy)."""
        images = _check_images(images)
        n = images.shape[0]
        batches = max(1, -(-n // self.batch_size))
        padded = self._pad(images, batches * self.batch_size)
        batch = sharding.batch_sharding(self.mesh)
        embeddings = []
        for i in range(batches):
            # An eager slice may come back with another layout: put it back on the batch axes.
            rows = jax.device_put(padded[i * self.batch_size : (i + 1) * self.batch_size], batch)
            embeddings.append(self._embed_images(self.params, rows))
        return self._concat(embeddings, n)

    @property
    def image_embedding_function(self):
        """The jitted image embedding: (params, uint8 NHWC images) -> L2-normalised embeddings."""
        return self._embed_images

    def compiled_batch(self, height: int, width: int) -> tuple[jax.stages.Compiled, tuple]:
        """Returns (the compiled embedding of one batch of `batch_size` uint8 height x width images,
        arguments to call it with); `compiled.cost_analysis()` gives its FLOPs."""
        zeros = np.zeros((self.batch_size, height, width, 3), np.uint8)
        args = (self.params, jax.device_put(zeros, sharding.batch_sharding(self.mesh)))
        return self._embed_images.lower(*args).compile(), args

    def text_embeddings(self, prompts: Sequence[str]) -> jax.Array:
        """Returns L2-normalised embeddings (m, d) of prompts, computing only the uncached ones."""
        prompts = list(prompts)
        check_prompts(self.clip.tokenizer, prompts, "scoring", allow_empty=True)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        for start in range(0, len(missing), TEXT_BATCH):
            batch = missing[start : start + TEXT_BATCH]
            ids = self.clip.tokenize(batch + [""] * (TEXT_BATCH - len(batch)))
            embeddings = np.asarray(self._embed_texts(self.params, ids))
            self._text_cache.update(zip(batch, embeddings))
        if not prompts:
            return jnp.zeros((0, self.clip.model.config.projection_dim), jnp.float32)
        return jax.device_put(np.stack([self._text_cache[p] for p in prompts]), sharding.replicated(self.mesh))

    def similarities(
        self,
        images: jax.Array,
        anchor_index_per_image: Sequence[int],
        anchor_prompts: Sequence[str],
        plain_prompts: Sequence[str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (sim_anchor (n,), sim_plain (n, len(plain_prompts))): cosines of each image to its
        anchor prompt (`anchor_prompts[anchor_index_per_image[i]]`) and to every plain prompt."""
        anchor_index = np.asarray(anchor_index_per_image, dtype=np.int64).reshape(-1)
        if anchor_index.shape[0] != images.shape[0]:
            raise ValueError(
                f"anchor_index_per_image has {anchor_index.shape[0]} entries for {images.shape[0]} images"
            )
        if anchor_index.size and (anchor_index.min() < 0 or anchor_index.max() >= len(anchor_prompts)):
            raise ValueError(
                f"anchor_index_per_image must lie in [0, {len(anchor_prompts)}); got "
                f"{anchor_index.min()}..{anchor_index.max()}"
            )
        if images.shape[0] == 0:
            return np.zeros((0,), np.float32), np.zeros((0, len(plain_prompts)), np.float32)
        image_embeddings = self.image_embeddings(images)
        texts = self.text_embeddings(list(anchor_prompts) + list(plain_prompts))
        # On the host: both are small and replicated, and a device matmul would compile anew for
        # every grid size (the grid shrinks each round).
        sims = np.asarray(image_embeddings) @ np.asarray(texts).T
        sim_anchor = sims[np.arange(len(anchor_index)), anchor_index]
        return sim_anchor, sims[:, len(anchor_prompts) :]

    def subject_similarities(self, images: jax.Array, subject_images: Sequence[np.ndarray]) -> np.ndarray:
        """Returns (n, S, S): for each image, cut into S vertical strips (`square_strips`), the
        mean cosine of each strip's embedding with those of each subject's images
        (`subject_images[s]`: uint8 (r_s, h, w, 3), r_s >= 1), in subject order."""
        images = _check_images(images)
        count = len(subject_images)
        if count < 2 or any(len(x) == 0 for x in subject_images):
            raise ValueError(f"the identity check needs images of >= 2 subjects, got {[len(x) for x in subject_images]}")
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, count, count), np.float32)
        strips = self._strips(images, count)
        embeddings = np.asarray(self.image_embeddings(strips)).reshape(n, count, -1)
        references = [np.asarray(self.image_embeddings(x)) for x in subject_images]
        return np.stack([(embeddings @ reference.T).mean(axis=-1) for reference in references], axis=-1)


def square_strips(images: jax.Array, strips: int) -> jax.Array:
    """Returns (n * strips, H, H, 3): each of the n uint8 (H, W, 3) images cut into `strips`
    vertical strips of W // strips columns (left to right, image by image), each centred on a white
    H x H square so CLIP sees all of it."""
    n, height, width, channels = images.shape
    step = width // strips
    if step < 1 or step > height:
        raise ValueError(f"cannot cut {height}x{width} images into {strips} strips no wider than they are tall")
    cut = images[:, :, : step * strips].reshape(n, height, strips, step, channels).transpose(0, 2, 1, 3, 4)
    left = (height - step) // 2
    padded = jnp.pad(cut, ((0, 0), (0, 0), (0, 0), (left, height - step - left), (0, 0)), constant_values=255)
    return padded.reshape(n * strips, height, height, channels)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Returns `x` padded with zeros along its leading axis to `rows` rows."""
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _check_images(images) -> jax.Array:
    """Returns `images` if they are uint8 (n, H, W, 3); raises ValueError naming the problem."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (n, height, width, 3) uint8, got shape {tuple(images.shape)}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 (as the generator returns them), got {images.dtype}")
    return images
