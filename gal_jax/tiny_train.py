"""Trains the tiny world's CLIP and VAE from scratch: the recipes, the steps and their loops.

1. CLIP, contrastively (symmetric InfoNCE with the learnable temperature; equal captions share the
   target; optionally each image's caption also competes with hard negatives, the caption with
   another object kind, as NegCLIP's), on exactly the pixels our Scorer feeds it at run time (`score.preprocess`);
   then a second stage with the text tower locked, so the SD's text encoder (that tower) stays fixed.
2. The VAE, for reconstruction (MSE + a small KL + an image-gradient term for sharp edges); its
   `scaling_factor` is 1 / std of the latents it produces, as SD's is.

The steps are pure functions with the data set held on the device: a step draws its batch from an
epoch permutation inside jit, so the loops copy nothing per step. The UNet and the whole build
(folders, figures) are in `tiny_build`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from gal_jax import models, score, train
from gal_jax.nn import clip as nn_clip
from gal_jax.nn import vae as nn_vae
from gal_jax.train import TrainState

Params = Any
LOG_EVERY = 25
LN_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature at 100


# ---------------------------------------------------------------------------------------------
# Recipes: sizes and schedules
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one model is optimised: AdamW, linear warmup then cosine decay to 0."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0

    def train_config(self) -> ml_collections.ConfigDict:
        """Returns the `config.train` fields `train.make_optimizer` reads."""
        return ml_collections.ConfigDict(dict(
            steps=self.steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
            warmup_steps=min(self.warmup_steps, self.steps), lr_schedule="cosine",
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
            adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
        ))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Architectures and schedules of the three models, and how the data is split."""

    text: dict
    vision: dict
    projection_dim: int
    vae: dict
    unet: dict
    clip_schedule: Schedule
    # A second CLIP stage with the text tower locked (the SD's text encoder stays what stage 1
    # made): contrastive learning picks up the whole-picture context first, and the objects and
    # colours only later, so the vision side trains on. None: one stage.
    clip_locked_schedule: Schedule | None
    vae_schedule: Schedule
    unet_schedule: Schedule
    # LiT's order reversed (a locked text tower, a new image tower): the first CLIP stage trains
    # this vision tower with the text tower, and the locked stage starts a fresh `vision` tower
    # against the finished text tower. A small scaffold is enough to teach the text tower; the
    # shipped vision tower can then be larger without slowing the joint stage. None: the one
    # `vision` tower goes through both stages. Needs `clip_locked_schedule`.
    joint_vision: dict | None = None
    # CLIP's image-to-text term also pits each caption against the same caption with another object
    # kind (`tiny_world.object_swaps`), as NegCLIP's hard negatives: random batches of this world
    # almost never hold two pictures that differ in the object only, so CLIP learns contexts and
    # colours and barely the object kind (38% zero-shot).
    clip_object_negatives: bool = False
    # The same with each caption's colour swaps (`tiny_world.colour_swaps`) too: object swaps alone
    # taught the object kind at the colour's expense (95% -> 86%).
    clip_colour_negatives: bool = False
    # CLIP batches of minimal pairs: half the batch drawn from the set, the other half their twins
    # (`tiny_world.training_twins`: the same picture with one of these attributes changed, caption
    # to match), so both directions of the loss hinge on that attribute (caption negatives reach
    # the image-to-text side only). Empty: plain random batches. Measured in session 26: twins
    # instead of caption negatives 69% on the object kind; twins beside them (twin_swap_wide) 78%
    # after the joint stage, with the text tower that tells the objects apart best so far.
    clip_twins: tuple[str, ...] = ()
    kl_weight: float = 1e-4
    edge_weight: float = 0.5
    held_out_fraction: float = 0.1
    # Of the training images, the share seen a second time with an empty caption, so the UNet
    # learns the unconditional prediction that classifier-free guidance subtracts.
    caption_dropout: float = 0.1
    # What the UNet predicts. With epsilon prediction an error in the picture's layout at high
    # noise costs SNR(t) times its x0 error (0.005 at t = 999), so the text, which alone decides the
    # whole-picture context there, is barely learnt; v-prediction (as SD 2.x) costs it about 1.
    prediction_type: str = "v_prediction"
    dtype: str = "float16"  # of the saved weights
    # How many held-out pictures the CLIP zero-shot figure uses, and base-model pictures per
    # anchor context the context-following figure draws (`tiny_build.measure_figures`): at 8 a
    # context one picture moves a context's share by 12.5 points, and the shipped UNet's forest
    # measured 62.5% at 8 and 37.5% at 24 (session 25).
    figure_images: int = 1_000
    figure_per_context: int = 24

    def __post_init__(self):
        if self.joint_vision is not None and self.clip_locked_schedule is None:
            raise ValueError("a recipe with joint_vision needs clip_locked_schedule: the locked stage "
                             "is where its vision tower is trained")

    @property
    def max_length(self) -> int:
        return int(self.text["max_position_embeddings"])


TEXT = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=32, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407,
)
VISION = dict(
    image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
    num_attention_heads=4,
)
VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)
DEFAULT_RECIPE = Recipe(
    text=TEXT, vision=VISION, projection_dim=64, vae=VAE, unet=UNET,
    clip_schedule=Schedule(steps=900, batch_size=128, learning_rate=1e-3, warmup_steps=50, weight_decay=0.1),
    clip_locked_schedule=Schedule(steps=2000, batch_size=128, learning_rate=1e-3, warmup_steps=50, weight_decay=0.1),
    vae_schedule=Schedule(steps=900, batch_size=16, learning_rate=1e-3, warmup_steps=50),
    unet_schedule=Schedule(steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=100),
)
# A few steps of small models: for tests and a quick look that the pipeline runs end to end.
SMOKE_RECIPE = dataclasses.replace(
    DEFAULT_RECIPE,
    text=dict(TEXT, num_hidden_layers=1, intermediate_size=64, hidden_size=32),
    vision=dict(VISION, num_hidden_layers=1, intermediate_size=64, hidden_size=32, patch_size=16),
    projection_dim=32,
    vae=dict(VAE, block_out_channels=(8, 16, 16), norm_num_groups=8),
    unet=dict(UNET, block_out_channels=(32, 32, 64), cross_attention_dim=32),
    clip_schedule=Schedule(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=1),
    clip_locked_schedule=Schedule(steps=3, batch_size=8, learning_rate=1e-3, warmup_steps=1),
    vae_schedule=Schedule(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=1),
    unet_schedule=Schedule(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1),
    figure_images=32, figure_per_context=1,
)
# Tried in session 17 and not shipped (README "The tiny world"): CLIP with each caption's object swaps
# as hard negatives, 1500 + 1500 steps. Object kind 38% -> 78%, but colour 95% -> 86%, context 98% ->
# 96%, and the UNet on its text tower drew the prompt's context less often (mean 84%, "in park" 0%).
OBJECT_NEGATIVES_RECIPE = dataclasses.replace(
    DEFAULT_RECIPE, clip_object_negatives=True,
    clip_schedule=dataclasses.replace(DEFAULT_RECIPE.clip_schedule, steps=1500),
    clip_locked_schedule=dataclasses.replace(DEFAULT_RECIPE.clip_locked_schedule, steps=1500),
)
# Tried in session 24 and not shipped: object and colour swaps as hard negatives (11 a caption). Context
# 95%, object 78%, colour 92%; the UNet on its text tower drew the prompt's context less often (mean
# 83%, "in park" 25%). The object kind seems limited by the vision tower (README "The tiny world").
SWAP_NEGATIVES_RECIPE = dataclasses.replace(OBJECT_NEGATIVES_RECIPE, clip_colour_negatives=True)
# Session 25: the swap_negatives text tower, then a fresh vision tower twice as wide and one layer
# deeper trained against it (`joint_vision`: the first stage keeps the small one). Its locked stage on
# the session-24 swap text tower: context 97%, object 83%, colour 92%; the object confusions left
# follow the text tower's (cup/teapot captions at cosine 0.96). Not shipped.
SWAP_LIT_RECIPE = dataclasses.replace(
    SWAP_NEGATIVES_RECIPE, joint_vision=VISION,
    vision=dict(VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4),
    clip_locked_schedule=dataclasses.replace(SWAP_NEGATIVES_RECIPE.clip_locked_schedule, steps=2500),
)
# Session 26: CLIP on minimal pairs (`clip_twins`: each picture beside its twin with another object
# kind or colour) instead of caption negatives, with swap_lit's two vision towers and schedules.
TWIN_LIT_RECIPE = dataclasses.replace(
    SWAP_LIT_RECIPE, clip_object_negatives=False, clip_colour_negatives=False, clip_twins=("object", "colour"))
# Session 26: twins and swap captions as negatives, and the wide vision tower in both stages (the
# text tower only learns to tell apart what the joint stage's vision tower can see). Shipped since
# session 29 (with the first recipe's VAE) and `make-tiny --train`'s default.
TWIN_SWAP_WIDE_RECIPE = dataclasses.replace(
    SWAP_LIT_RECIPE, joint_vision=None, clip_twins=("object", "colour"))
RECIPES = {"twin_swap_wide": TWIN_SWAP_WIDE_RECIPE, "first": DEFAULT_RECIPE, "smoke": SMOKE_RECIPE,
           "object_negatives": OBJECT_NEGATIVES_RECIPE, "swap_negatives": SWAP_NEGATIVES_RECIPE,
           "swap_lit": SWAP_LIT_RECIPE, "twin_lit": TWIN_LIT_RECIPE}


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------

def world_dataset(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Returns (uint8 images, captions) of the tiny world's pretraining set of `count` scenes
    (balanced contexts, objects, colours and patterns; a tenth styled)."""
    from gal_jax import tiny_world

    return _images_and_captions(tiny_world.training_scenes(count, seed))


def world_twins(count: int, seed: int, attributes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Returns (uint8 images, captions) of the twins of `world_dataset(count, seed)`'s scenes, row
    for row (`tiny_world.training_twins`)."""
    from gal_jax import tiny_world

    return _images_and_captions(tiny_world.training_twins(count, seed, attributes))


def _images_and_captions(scenes) -> tuple[np.ndarray, list[str]]:
    scenes = list(scenes)
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def split_held_out(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train indices, held-out indices): a random `fraction` (at least 2) held out."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(2, int(round(count * fraction)))
    return np.sort(order[held:]), np.sort(order[:held])


def caption_groups(captions: Sequence[str]) -> np.ndarray:
    """Returns int32 ids, equal exactly where the captions are equal."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(c, len(index)) for c in captions], np.int32)


def epoch_batch_indices(key: jax.Array, step: jax.Array, count: int, batch_size: int) -> jax.Array:
    """Returns the `step`-th batch of indices into `count` examples: each epoch a fresh
    permutation, cut into count // batch_size batches (the remainder skipped)."""
    per_epoch = count // batch_size
    epoch, position = step // per_epoch, step % per_epoch
    order = jax.random.permutation(jax.random.fold_in(key, epoch), count)
    return jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipData:
    """The CLIP training set on the device: uint8 images, token ids, caption groups."""

    images: jax.Array  # (N, H, W, 3) uint8
    input_ids: jax.Array  # (N, L) int32
    groups: jax.Array  # (N,) int32: equal captions, equal ids
    # (N, L) int32: the captions without their identifier words (`tiny_world.IDENTIFIERS`), equal
    # to input_ids where a caption has none; None: no identifier term in the loss.
    plain_ids: jax.Array | None = None
    # (N, K, L) int32: per image K captions that differ from its own in one attribute only (the
    # object kind: `tiny_world.object_swaps`), extra negatives of its image-to-text term; None: none.
    negative_ids: jax.Array | None = None
    # Each image's twin (`tiny_world.training_twins`), row for row: (N, H, W, 3) uint8, (N, L) int32
    # and (N,) int32 groups numbered with `groups` (equal captions, equal group), and with
    # `negative_ids` the twins' own (N, K, L) hard negatives. None: no twins.
    twin_images: jax.Array | None = None
    twin_ids: jax.Array | None = None
    twin_groups: jax.Array | None = None
    twin_negative_ids: jax.Array | None = None

    def __post_init__(self):
        if self.twin_images is not None and self.negative_ids is not None and self.twin_negative_ids is None:
            raise ValueError("with caption negatives, the twins need theirs too (twin_negative_ids)")


jax.tree_util.register_dataclass(
    ClipData, data_fields=["images", "input_ids", "groups", "plain_ids", "negative_ids", "twin_images", "twin_ids",
                           "twin_groups", "twin_negative_ids"], meta_fields=[])


def trim_padding(*token_ids: np.ndarray | None, eos_token_id: int) -> tuple[np.ndarray | None, ...]:
    """Returns the token id arrays (each (..., L); None passes through) cut after the last column
    where any of them still holds its first end-of-text token: CLIP's text attention is causal and
    its pooled output is read at that token, so the cut columns change no embedding, and training
    skips them (the world's captions take about a third of the 32 positions)."""
    present = [ids for ids in token_ids if ids is not None and ids.size]
    length = 1 + max(int(np.argmax(ids == eos_token_id, axis=-1).max()) for ids in present)
    return tuple(None if ids is None else ids[..., :length] for ids in token_ids)


def clip_config(recipe: Recipe, vision: dict | None = None) -> nn_clip.ClipConfig:
    """Returns the CLIP config of the recipe (with `vision` instead of its vision tower)."""
    return nn_clip.ClipConfig.from_dict(dict(text_config=recipe.text, vision_config=vision or recipe.vision,
                                             projection_dim=recipe.projection_dim))


def init_clip(recipe: Recipe, seed: int, vision: dict | None = None) -> tuple[nn_clip.ClipModel, Params]:
    """Returns (our CLIP module, freshly initialised params); `vision` as clip_config takes it."""
    model = nn_clip.ClipModel(clip_config(recipe, vision))
    return model, nn_clip.init_params(model, jax.random.key(seed))


def with_fresh_vision_tower(recipe: Recipe, params: Params, seed: int) -> tuple[nn_clip.ClipModel, Params]:
    """Returns (the recipe's CLIP, params): `params`' text tower, text projection and logit
    scale, and a freshly initialised vision tower and projection of `recipe.vision`."""
    model, fresh = init_clip(recipe, seed)
    kept = ("text_model", "text_projection", "logit_scale")
    return model, {**fresh, **{name: params[name] for name in kept}}


def text_features(model: nn_clip.ClipModel, params: Params, input_ids: jax.Array) -> jax.Array:
    """Returns L2-normalised text embeddings of token ids."""
    return score.l2_normalize(model.apply({"params": params}, input_ids, method=nn_clip.ClipModel.text_features))


def clip_embeddings(model: nn_clip.ClipModel, params: Params, images: jax.Array, input_ids: jax.Array):
    """Returns L2-normalised (image, text) embeddings, images preprocessed as the Scorer does."""
    vision = model.config.vision
    pixels = score.preprocess(images, vision.image_size, models.CLIP_MEAN, models.CLIP_STD)
    image = model.apply({"params": params}, pixels, method=nn_clip.ClipModel.image_features)
    return score.l2_normalize(image), text_features(model, params, input_ids)


def contrastive_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, groups: jax.Array,
                     negatives: jax.Array | None = None):
    """Returns CLIP's symmetric InfoNCE of normalised embeddings; examples with the same caption
    group share the target mass, so a duplicate caption in the batch is not a negative.

    `negatives` (B, K, D), normalised: per image K hard-negative captions (as NegCLIP's), added to
    that image's image-to-text candidates only (they are nobody's positive)."""
    scale = jnp.exp(jnp.minimum(logit_scale, LN_MAX_LOGIT_SCALE))
    logits = scale * image @ text.T
    same = (groups[:, None] == groups[None, :]).astype(jnp.float32)
    targets = same / same.sum(axis=1, keepdims=True)
    text_to_image = optax.softmax_cross_entropy(logits.T, targets).mean()
    if negatives is not None:
        logits = jnp.concatenate([logits, scale * jnp.einsum("bd,bkd->bk", image, negatives)], axis=1)
        targets = jnp.pad(targets, ((0, 0), (0, negatives.shape[1])))
    image_to_text = optax.softmax_cross_entropy(logits, targets).mean()
    return (image_to_text + text_to_image) / 2


def identifier_loss(text: jax.Array, plain_text: jax.Array) -> jax.Array:
    """Returns the mean squared distance between normalised text embeddings of captions and of the
    same captions without identifier words: an identifier must not move a caption's embedding
    (contrastive learning alone leaves it free to, and a moved anchor prompt biases every CLIP
    similarity GAL's overfit test compares). Zero for captions without identifiers."""
    return jnp.mean(jnp.sum(jnp.square(text - plain_text), axis=-1))


def clip_train_step(state: TrainState, clip_data: ClipData, key: jax.Array, *, model, optimizer,
                    batch_size: int, locked_text: bool = False):
    """Returns (state after one AdamW update on the step's batch, {"loss"}); with `locked_text`
    no gradient flows into the text tower (pair with `clip_optimizer(..., locked_text=True)`);
    with `clip_data.plain_ids` the loss adds `identifier_loss` (text tower trained only); with
    `clip_data.negative_ids` each image's captions compete with its hard negatives too; with
    `clip_data.twin_images` half the batch is drawn and the other half is the drawn rows' twins."""
    twins = clip_data.twin_images is not None
    rows = epoch_batch_indices(key, state.step, clip_data.groups.shape[0], batch_size // 2 if twins else batch_size)
    images, ids, groups = clip_data.images[rows], clip_data.input_ids[rows], clip_data.groups[rows]
    if twins:  # minimal pairs: each drawn image beside its twin
        images = jnp.concatenate([images, clip_data.twin_images[rows]])
        ids = jnp.concatenate([ids, clip_data.twin_ids[rows]])
        groups = jnp.concatenate([groups, clip_data.twin_groups[rows]])
    with_identifiers = clip_data.plain_ids is not None and not locked_text

    def loss_fn(params):
        if locked_text:
            params = {**params, "text_model": jax.lax.stop_gradient(params["text_model"])}
        image, text = clip_embeddings(model, params, images, ids)
        negatives = None
        if clip_data.negative_ids is not None:
            negative_ids = clip_data.negative_ids[rows]
            if twins:
                negative_ids = jnp.concatenate([negative_ids, clip_data.twin_negative_ids[rows]])
            negatives = text_features(model, params, negative_ids.reshape(-1, negative_ids.shape[-1]))
            negatives = negatives.reshape(*negative_ids.shape[:2], -1)
        loss = contrastive_loss(image, text, params["logit_scale"], groups, negatives)
        if with_identifiers:  # the drawn captions' (a twin keeps its pair's identifier)
            drawn = text[: rows.shape[0]]
            loss = loss + identifier_loss(drawn, text_features(model, params, clip_data.plain_ids[rows]))
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], LN_MAX_LOGIT_SCALE)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}


def clip_optimizer(schedule: Schedule, *, locked_text: bool = False) -> optax.GradientTransformation:
    """Returns AdamW for CLIP; with `locked_text` the text tower is left exactly as it is (no
    update, no weight decay)."""
    adamw = train.make_optimizer(schedule.train_config())
    if not locked_text:
        return adamw

    def labels(params):
        return {name: jax.tree_util.tree_map(lambda _, n=name: "locked" if n == "text_model" else "trained", value)
                for name, value in params.items()}

    return optax.multi_transform({"trained": adamw, "locked": optax.set_to_zero()}, labels)


def train_clip(model, params: Params, clip_data: ClipData, schedule: Schedule, seed: int,
               progress: bool = True, *, locked_text: bool = False) -> tuple[Params, list[float]]:
    """Returns (trained params, loss per log window); `locked_text` keeps the text tower as it is."""
    optimizer = clip_optimizer(schedule, locked_text=locked_text)
    step = functools.partial(clip_train_step, model=model, optimizer=optimizer, locked_text=locked_text,
                             batch_size=_batch_size(schedule, clip_data.groups.shape[0],
                                                       pairs=clip_data.twin_images is not None))
    name = "CLIP (text tower locked)" if locked_text else "CLIP"
    return _run_loop(step, params, optimizer, clip_data, schedule.steps, seed, name, progress)


def retrieval_accuracy(model, params: Params, images: np.ndarray, input_ids: np.ndarray,
                       groups: np.ndarray, batch_size: int = 256) -> float:
    """Returns top-1 image->text accuracy: the share of images whose most similar caption, among
    the set's distinct captions, is their own."""
    distinct = np.unique(groups, return_index=True)[1]
    embed = jax.jit(functools.partial(clip_embeddings, model))
    image_parts, text_parts = [], []
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        image, text = embed(params, images[rows], input_ids[rows])
        image_parts.append(np.asarray(image))
        text_parts.append(np.asarray(text))
    image, text = np.concatenate(image_parts), np.concatenate(text_parts)[distinct]
    best = np.argmax(image @ text.T, axis=1)
    return float(np.mean(groups[distinct][best] == groups))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def vae_module(recipe: Recipe) -> nn_vae.AutoencoderKL:
    """Returns the recipe's VAE, NHWC in and out (images and latents)."""
    return nn_vae.AutoencoderKL(nn_vae.VaeConfig.from_dict(recipe.vae), layout="NHWC")


def init_vae(recipe: Recipe, seed: int):
    """Returns (our AutoencoderKL (NHWC), freshly initialised params)."""
    vae = vae_module(recipe)
    return vae, nn_vae.init_params(vae, jax.random.key(seed))


def to_unit_range(images: jax.Array) -> jax.Array:
    """Returns uint8 NHWC images as float32 NHWC in [-1, 1], as the VAE reads pixels."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def _image_gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def vae_loss(params: Params, images: jax.Array, key: jax.Array, *, vae, kl_weight: float,
             edge_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, parts): pixel MSE of a posterior sample's reconstruction, plus
    edge_weight * MSE of its image gradients, plus kl_weight * KL per latent element."""
    pixels = to_unit_range(images)
    posterior = vae.apply({"params": params}, pixels, method=nn_vae.AutoencoderKL.encode)
    decoded = vae.apply({"params": params}, posterior.sample(key), method=nn_vae.AutoencoderKL.decode)
    mse = jnp.mean(jnp.square(decoded - pixels))
    edge = sum(jnp.mean(jnp.square(a - b)) for a, b in
               zip(_image_gradients(decoded), _image_gradients(pixels)))
    kl = jnp.mean(posterior.kl()) / posterior.mean[0].size
    loss = mse + edge_weight * edge + kl_weight * kl
    return loss, {"loss": loss, "mse": mse, "kl": kl}


def vae_train_step(state: TrainState, images: jax.Array, key: jax.Array, *, vae, optimizer,
                   batch_size: int, kl_weight: float, edge_weight: float):
    """Returns (state after one AdamW update on the step's batch, loss parts)."""
    order_key, sample_key = jax.random.split(key)
    rows = epoch_batch_indices(order_key, state.step, images.shape[0], batch_size)
    sample_key = jax.random.fold_in(sample_key, state.step)
    grad_fn = jax.value_and_grad(
        functools.partial(vae_loss, vae=vae, kl_weight=kl_weight, edge_weight=edge_weight), has_aux=True
    )
    (_, metrics), grads = grad_fn(state.params, images[rows], sample_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_vae(vae, params: Params, images: jax.Array, recipe: Recipe, seed: int,
              progress: bool = True) -> tuple[Params, list[float]]:
    """Returns (trained params, loss per log window)."""
    schedule = recipe.vae_schedule
    optimizer = train.make_optimizer(schedule.train_config())
    step = functools.partial(vae_train_step, vae=vae, optimizer=optimizer,
                             batch_size=_batch_size(schedule, images.shape[0]),
                             kl_weight=recipe.kl_weight, edge_weight=recipe.edge_weight)
    return _run_loop(step, params, optimizer, images, schedule.steps, seed, "VAE", progress)


def _encode_decode(vae, params, images):
    posterior = vae.apply({"params": params}, to_unit_range(images), method=nn_vae.AutoencoderKL.encode)
    return posterior, vae.apply({"params": params}, posterior.mean, method=nn_vae.AutoencoderKL.decode)


def vae_psnr(vae, params: Params, images: np.ndarray, batch_size: int = 64) -> float:
    """Returns the PSNR (dB, peak 255) of the posterior means' reconstructions of uint8 images."""
    run = jax.jit(lambda p, x: _encode_decode(vae, p, x)[1])
    errors = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        decoded = np.asarray(run(params, batch))
        restored = np.clip(np.round((decoded + 1.0) * 127.5), 0, 255)
        errors.append(np.square(restored - batch.astype(np.float64)).reshape(len(batch), -1).mean(1))
    mse = float(np.mean(np.concatenate(errors)))
    return 10.0 * math.log10(255.0**2 / max(mse, 1e-10))


def latent_scaling_factor(vae, params: Params, images: np.ndarray, seed: int, batch_size: int = 64) -> float:
    """Returns 1 / std of posterior samples of the images' latents (SD's `scaling_factor` rule)."""

    @jax.jit
    def sample(p, x, key):
        return _encode_decode(vae, p, x)[0].sample(key)

    latents = [np.asarray(sample(params, images[start : start + batch_size], jax.random.key(seed + start)))
               for start in range(0, len(images), batch_size)]
    return float(1.0 / np.concatenate(latents).std())


# ---------------------------------------------------------------------------------------------
# The loop shared by CLIP and VAE
# ---------------------------------------------------------------------------------------------


def _batch_size(schedule: Schedule, count: int, pairs: bool = False) -> int:
    if count < schedule.batch_size:
        raise ValueError(f"{count} training images are fewer than one batch of {schedule.batch_size}")
    if pairs and schedule.batch_size % 2:
        raise ValueError(f"batches of twins need an even batch size, got {schedule.batch_size}")
    return schedule.batch_size


def _new_state(params: Params, optimizer) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _run_loop(step_fn, params, optimizer, train_data, steps: int, seed: int, name: str,
              progress: bool) -> tuple[Params, list[float]]:
    """Returns (params after `steps` jitted steps, mean loss per window of LOG_EVERY steps).

    Metrics stay on the device until a window ends; a non-finite loss raises naming the step.
    """
    state = _new_state(jax.tree_util.tree_map(jnp.copy, params), optimizer)
    compiled = jax.jit(step_fn, donate_argnums=0)
    key, windows, pending = jax.random.key(seed), [], []
    with tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True, disable=not progress) as bar:
        for done in range(1, steps + 1):
            state, metrics = compiled(state, train_data, key)
            pending.append(metrics["loss"])
            bar.update(1)
            if done % LOG_EVERY == 0 or done == steps:
                losses = np.asarray(jax.device_get(pending))
                if not np.all(np.isfinite(losses)):
                    bad = done - len(losses) + int(np.argmin(np.isfinite(losses)))
                    raise FloatingPointError(f"{name} training loss is not finite at step {bad}")
                windows.append(float(losses.mean()))
                bar.set_postfix(loss=f"{windows[-1]:.4f}")
                pending = []
    return state.params, windows
