"""What a round trains, for every personalization method: the trainable part of the model, the
stages, and the round's result that generation, evaluation and export take.

A method trains inside one *model tree* (a dict):

    {"unet": UNet params, "text_encoder": text-encoder params,
     "lora": {"unet": {<module path>: {"down": (in, r), "up": (r, out)}},    # LoRA methods
              "text_encoder": {...}},                                         # (optional)
     "new_tokens": (n, D)}                                                    # new-token methods

Each stage trains the leaves whose '/'-joined path matches its `trainable` regex (`split`); the
rest is a frozen input of the step and is merged back inside it (`merge`). So the train state,
its AdamW moments, its gradients and the checkpoints hold only what is trained: with
optax.multi_transform and set_to_zero the frozen weights would sit in the donated state and get
gradients. `materialize` turns a model tree into the weights the models apply: every LoRA target
W + (alpha / r) down @ up, the token table with the new rows appended.

The methods (`METHODS`, config.train.method):
  dreambooth          the whole UNet (the paper's GAL)
  lora                rank-r deltas on the UNet's attention projections (DreamBooth-LoRA), and
                      optionally on the text encoder's (config.lora.train_text_encoder)
  textual_inversion   the new token's embedding only (the placeholder becomes one new token)
  attndreambooth      AttnDreamBooth's three stages: the new token, then the cross-attention
                      layers, then the whole UNet, with the cross-attention map regularizer
  mudi                MuDI: LoRA on several subjects at once (a metadata.jsonl concept), with
                      Seg-Mix in the input pipeline (config.data.segmix) and DCO or prior
                      preservation as configs/sd_mudi.py sets them
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from gal_jax.nn import tokens as nn_tokens

Params = Any
METHODS = ("dreambooth", "lora", "textual_inversion", "attndreambooth", "mudi")
# What each single-stage method trains when config.train.trainable is '' (AttnDreamBooth's stages
# name their own).
DEFAULT_TRAINABLE = {"dreambooth": r"^unet/", "lora": r"^lora/", "textual_inversion": r"^new_tokens$",
                     "mudi": r"^lora/"}
NEW_TOKEN_METHODS = ("textual_inversion", "attndreambooth")
LORA_METHODS = ("lora", "mudi")  # the methods whose model tree holds LoRA deltas (config.lora)
MULTI_SUBJECT_METHODS = ("mudi",)  # the methods that need a multi-subject concept
# diffusers' DreamBooth-LoRA targets (to_q, to_k, to_v, to_out.0 of every attention layer) and,
# with --train_text_encoder, the text encoder's (q_proj, k_proj, v_proj, out_proj of every layer).
DEFAULT_LORA_TARGETS = r"attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$"
DEFAULT_TEXT_LORA_TARGETS = r"self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$"
SEPARATOR = "/"


class MethodConfigError(ValueError):
    """config.train.method, its stages or its LoRA settings cannot work."""


# ---------------------------------------------------------------------------------------------
# The round's result
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Personalization:
    """What a round learned: the fine-tuned UNet (None: the base UNet), LoRA deltas (None: none)
    and the rows of new tokens (None: none). `lora_scale` is alpha / rank."""

    unet: Params | None = None
    lora: Params | None = None
    new_tokens: jax.Array | None = None
    lora_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    def apply(self, base):
        """Returns the models.StableDiffusionParams of the base with this personalization in
        (LoRA merged into the UNet's weights, the token table grown)."""
        tree = {"unet": base.unet if self.unet is None else self.unet, "text_encoder": base.text_encoder}
        if self.lora is not None:
            tree["lora"] = self.lora
        if self.new_tokens is not None:
            tree["new_tokens"] = self.new_tokens
        unet, text = materialize(tree, self.lora_scale)
        return dataclasses.replace(base, unet=unet, text_encoder=text)


# ---------------------------------------------------------------------------------------------
# Methods and their stages (from the config)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: its name and config.train with the stage's overrides."""

    name: str
    train: ml_collections.ConfigDict

    @property
    def trainable(self) -> str:
        return self.train.trainable


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which kernels get low-rank deltas (regexes over '/'-joined UNet and text-encoder param
    paths; '' text_encoder_targets: none of the text encoder's) and their rank."""

    rank: int
    alpha: float
    targets: str
    text_encoder_targets: str = ""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Method:
    """A personalization method as a run trains it: its stages, LoRA spec and new tokens."""

    name: str
    stages: tuple[Stage, ...]
    lora: LoraSpec | None = None
    new_tokens: nn_tokens.NewTokens | None = None

    @property
    def lora_scale(self) -> float:
        return self.lora.scale if self.lora else 1.0

    def result(self, tree: Params, trained_parts: Sequence[str]) -> Personalization:
        """Returns the round's Personalization of a trained model tree; `trained_parts` are the
        tree's top-level keys some stage trained (the UNet is kept only when one did)."""
        return Personalization(
            unet=tree["unet"] if "unet" in trained_parts else None, lora=tree.get("lora"),
            new_tokens=tree.get("new_tokens"), lora_scale=self.lora_scale,
        )


def method_name(config: ml_collections.ConfigDict) -> str:
    """Returns config.train.method, checked ('dreambooth' when the field is absent)."""
    name = config.train.get("method", "dreambooth")
    if name not in METHODS:
        raise MethodConfigError(f"config.train.method={name!r}; expected one of {METHODS}")
    return name


def stages_from_config(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
    """Returns the method's stages: one per entry of config.train.stages, run in the order of
    their names (s1_..., s2_...), each config.train with the entry's fields replaced (a loss term's
    settings are merged: `loss_terms=dict(attention_map=dict(mean=2.0))` keeps its other settings);
    or, with no stages, config.train itself as the one stage.

    Raises MethodConfigError naming an entry's field that config.train lacks, or a trainable regex
    that is empty or does not compile.
    """
    name = method_name(config)
    train = config.train
    entries = dict(train.get("stages") or {})
    base = ml_collections.ConfigDict(train.to_dict())
    base.stages = ml_collections.ConfigDict()
    if not entries:
        if name == "attndreambooth":
            raise MethodConfigError("config.train.method='attndreambooth' needs config.train.stages "
                                    "(configs/sd21_attndreambooth.py has the authors' three)")
        return (Stage(name, _with_trainable(base, name, "config.train")),)
    stages = []
    for stage_name in sorted(entries):
        overrides = dict(entries[stage_name])
        stage = ml_collections.ConfigDict(base.to_dict())
        for key, value in overrides.items():
            if key not in stage or key == "stages":
                raise MethodConfigError(f"config.train.stages.{stage_name}.{key}: config.train has no field {key!r}")
            if key == "loss_terms":  # a term's settings are merged into config.train's
                merged = {term: dict(settings) for term, settings in stage.loss_terms.items()}
                for term, settings in dict(value or {}).items():
                    merged.setdefault(term, {}).update(dict(settings or {}))
                value = ml_collections.ConfigDict(merged)
            stage[key] = value
        stages.append(Stage(stage_name, _with_trainable(stage, name, f"config.train.stages.{stage_name}")))
    return tuple(stages)


def _with_trainable(train: ml_collections.ConfigDict, method: str, where: str) -> ml_collections.ConfigDict:
    """Returns `train` with its trainable regex filled in from the method's default and checked."""
    pattern = train.get("trainable", "") or DEFAULT_TRAINABLE.get(method, "")
    if not pattern:
        raise MethodConfigError(f"{where}.trainable is empty: say which parameters the stage trains "
                                "(a regex over paths like unet/.../attn2/to_k/kernel, new_tokens, lora/...)")
    train.trainable = _checked_regex(pattern, f"{where}.trainable")
    return train


def _checked_regex(pattern: str, field: str) -> str:
    """Returns `pattern`; raises MethodConfigError naming `field` when it does not compile."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise MethodConfigError(f"{field}={pattern!r} is not a regex ({err})") from None
    return pattern


def lora_from_config(config: ml_collections.ConfigDict) -> LoraSpec | None:
    """Returns the LoRA spec of config.lora for the LoRA methods, else None."""
    if method_name(config) not in LORA_METHODS:
        return None
    lora = config.get("lora") or ml_collections.ConfigDict()
    rank, alpha = int(lora.get("rank", 4)), float(lora.get("alpha", 0.0) or lora.get("rank", 4))
    targets = lora.get("targets", "") or DEFAULT_LORA_TARGETS
    text_targets = ""
    if lora.get("train_text_encoder", False):
        text_targets = lora.get("text_encoder_targets", "") or DEFAULT_TEXT_LORA_TARGETS
    if rank < 1:
        raise MethodConfigError(f"config.lora.rank={rank} must be >= 1")
    if not alpha > 0:
        raise MethodConfigError(f"config.lora.alpha={alpha} must be > 0 (0 means the rank)")
    _checked_regex(targets, "config.lora.targets")
    _checked_regex(text_targets, "config.lora.text_encoder_targets")
    return LoraSpec(rank=rank, alpha=alpha, targets=targets, text_encoder_targets=text_targets)


def prepare(config: ml_collections.ConfigDict, sd, *, placeholder: str = "", class_word: str = ""):
    """Returns (sd, Method) for config.train.method: for the new-token methods, `sd` with the
    placeholder added to its tokenizer as one new token (initialised from config.train.new_token_init,
    else the first word of `class_word`) and its text encoder's table grown by a row.
    """
    name = method_name(config)
    lora = lora_from_config(config)
    if getattr(sd, "is_sdxl", False):
        _check_sdxl_method(name, lora)
    stages = stages_from_config(config)
    new = None
    if name in NEW_TOKEN_METHODS:
        token = config.train.get("new_token", "") or placeholder
        init_word = config.train.get("new_token_init", "") or (class_word.split() or [""])[0]
        if not token or not init_word:
            raise MethodConfigError(
                f"config.train.method={name!r} adds the concept's placeholder as a new token initialised "
                f"from its class word; this run has placeholder {token!r} and class word {init_word!r} "
                "(object concepts only; set config.train.new_token and config.train.new_token_init)")
        sd, new = add_new_tokens(sd, [token], [init_word])
    return sd, Method(name=name, stages=stages, lora=lora, new_tokens=new)


def _check_sdxl_method(name: str, lora: LoraSpec | None) -> None:
    """Raises MethodConfigError for what SDXL's two text encoders do not support yet: new tokens
    (both tables would need them, and diffusers' loader reads them per encoder) and text-encoder LoRA."""
    if name in NEW_TOKEN_METHODS:
        raise MethodConfigError(
            f"config.train.method={name!r} is not supported on SDXL yet: its new token would need rows in both "
            f"text encoders; use 'dreambooth' or 'lora' (UNet LoRA)")
    if lora is not None and lora.text_encoder_targets:
        raise MethodConfigError("config.lora.train_text_encoder is not supported on SDXL yet (two text encoders); "
                                "train UNet LoRA only (config.lora.train_text_encoder=False)")


def add_new_tokens(sd, new_tokens: Sequence[str], init_words: Sequence[str]):
    """Returns (sd with a tokenizer that knows `new_tokens` and a text encoder with their rows,
    NewTokens)."""
    if sd.is_sdxl:
        raise MethodConfigError("new tokens are not supported on SDXL yet (they would need rows in both text encoders)")
    table = sd.vocab_size
    try:
        tokenizer, new = nn_tokens.add_tokens(sd.tokenizer, new_tokens, init_words, vocab_size=table)
    except ValueError as err:
        raise MethodConfigError(f"{err} (config.train.new_token / config.train.new_token_init)") from None
    return dataclasses.replace(sd, tokenizer=tokenizer, text_encoder=nn_tokens.grown_model(sd.text_encoder, new)), new


# ---------------------------------------------------------------------------------------------
# The model tree: build, split, merge, materialize (pure)
# ---------------------------------------------------------------------------------------------


def model_tree(method: Method, base, key: jax.Array) -> dict[str, Params]:
    """Returns the model tree a round starts from: the base UNet and text encoder, plus zero-effect
    LoRA deltas (down random, up zero) and the new tokens' rows (copies of their initialisers')."""
    tree = {"unet": base.unet, "text_encoder": base.text_encoder}
    if method.lora is not None:
        tree["lora"] = {"unet": init_lora(base.unet, method.lora.targets, method.lora.rank, key)}
        if method.lora.text_encoder_targets:
            tree["lora"]["text_encoder"] = init_lora(
                base.text_encoder, method.lora.text_encoder_targets, method.lora.rank, jax.random.split(key)[1],
                "config.lora.text_encoder_targets", "text encoder")
    if method.new_tokens is not None:
        table = _token_table(base.text_encoder)
        tree["new_tokens"] = jnp.asarray(table)[jnp.asarray(method.new_tokens.init_ids)]
    return tree


def _token_table(text_params: Params) -> jax.Array:
    return traverse_util.flatten_dict(text_params)[nn_tokens.TOKEN_TABLE]


def lora_target_paths(params: Params, targets: str) -> list[tuple[str, ...]]:
    """Returns the paths of the 2-D kernels of `params` whose '/'-joined path matches `targets`."""
    return [path for path, leaf in traverse_util.flatten_dict(params).items()
            if path[-1] == "kernel" and len(leaf.shape) == 2 and re.search(targets, SEPARATOR.join(path))]


def init_lora(params: Params, targets: str, rank: int, key: jax.Array, field: str = "config.lora.targets",
              model: str = "UNet") -> Params:
    """Returns {module path...: {"down": (in, r), "up": (r, out)}} for every kernel of `params` the
    `targets` regex picks: down uniform in +-1/sqrt(in) (PEFT's kaiming-uniform), up zero, both
    float32. Raises MethodConfigError naming `field` when the regex picks none of `model`'s."""
    paths = lora_target_paths(params, targets)
    if not paths:
        raise MethodConfigError(f"{field}={targets!r} matches no 2-D kernel of the {model}")
    flat = traverse_util.flatten_dict(params)
    lora = {}
    for index, path in enumerate(paths):
        fan_in, fan_out = flat[path].shape
        bound = 1.0 / math.sqrt(fan_in)
        down = jax.random.uniform(jax.random.fold_in(key, index), (fan_in, rank), jnp.float32, -bound, bound)
        lora[path[:-1] + ("down",)] = down
        lora[path[:-1] + ("up",)] = jnp.zeros((rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(lora)


def apply_lora(params: Params, lora: Params, scale: float) -> Params:
    """Returns `params` with every kernel that `lora` has deltas for replaced by
    W + scale * down @ up (in W's dtype)."""
    flat = dict(traverse_util.flatten_dict(params))
    for module, pair in lora_pairs(lora).items():
        path = module + ("kernel",)
        if path not in flat:
            raise ValueError(f"LoRA deltas for {SEPARATOR.join(module)}, which has no kernel")
        kernel = flat[path]
        delta = jnp.dot(pair["down"].astype(jnp.float32), pair["up"].astype(jnp.float32))
        flat[path] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_pairs(lora: Params) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """Returns {module path: {"down": ..., "up": ...}} of a LoRA tree."""
    pairs: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for path, leaf in traverse_util.flatten_dict(lora).items():
        pairs.setdefault(path[:-1], {})[path[-1]] = leaf
    return pairs


def materialize(tree: dict[str, Params], lora_scale: float = 1.0) -> tuple[Params, Params]:
    """Returns (UNet params, text-encoder params) of a model tree: LoRA deltas added, the new
    tokens' rows appended to the token table."""
    unet, text = tree["unet"], tree["text_encoder"]
    lora = tree.get("lora") or {}
    if "unet" in lora:
        unet = apply_lora(unet, lora["unet"], lora_scale)
    if "text_encoder" in lora:
        text = apply_lora(text, lora["text_encoder"], lora_scale)
    if tree.get("new_tokens") is not None:
        flat = dict(traverse_util.flatten_dict(text))
        table = flat[nn_tokens.TOKEN_TABLE]
        flat[nn_tokens.TOKEN_TABLE] = jnp.concatenate([table, tree["new_tokens"].astype(table.dtype)], axis=0)
        text = traverse_util.unflatten_dict(flat)
    return unet, text


def split(tree: Params, trainable: str) -> tuple[Params, Params]:
    """Returns (the leaves whose '/'-joined path matches the `trainable` regex, the others), each as
    a nested dict; raises MethodConfigError when nothing matches."""
    flat = traverse_util.flatten_dict(tree)
    pattern = re.compile(trainable)
    chosen = {path: leaf for path, leaf in flat.items() if pattern.search(SEPARATOR.join(path))}
    if not chosen:
        examples = ", ".join(SEPARATOR.join(path) for path in list(flat)[:3])
        raise MethodConfigError(f"trainable={trainable!r} matches no parameter (paths look like {examples}, ...)")
    rest = {path: leaf for path, leaf in flat.items() if path not in chosen}
    return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge(trained: Params, rest: Params) -> Params:
    """Returns the model tree of `split`'s two parts."""
    flat = dict(traverse_util.flatten_dict(rest))
    flat.update(traverse_util.flatten_dict(trained))
    return traverse_util.unflatten_dict(flat)


def logical_axes(sd) -> dict[str, Params]:
    """Returns the model tree's logical PartitionSpecs (the UNet's and the text encoder's; LoRA
    deltas and new rows are small and replicated)."""
    axes = sd.logical_axes()
    return {"unet": axes.unet, "text_encoder": axes.text_encoder}
