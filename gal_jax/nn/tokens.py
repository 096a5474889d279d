"""New tokens for a CLIP text tower: the vocabulary grows, each new row starts as a given word's.

Textual inversion (and AttnDreamBooth's first stage) learns the embedding of a new token such as
"<sks>", initialised from a class word such as "cat". This module does the growing, purely:

    tokenizer, new = tokens.add_tokens(tokenizer, ["<sks>"], ["cat"])   # a copy; `new.ids`
    params = tokens.grow_embeddings(params, new)                        # rows appended
    model = tokens.grown_model(model, new)                              # vocab_size += 1
    labels = tokens.optimizer_labels(params)       # "new_tokens" on the table, "frozen" elsewhere
    updates = tokens.freeze_old_rows(updates, new)  # inside the train step: old rows stay put

The tokenizer keeps each new token whole (transformers' added tokens), and its id is the row the
table gains, so `add_tokens` refuses a tokenizer whose size differs from the table it is meant
for. Initialisation follows diffusers' textual-inversion script: every new row is a copy of the
initialiser word's row, and the word must be exactly one token.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
from flax import traverse_util

Params = Any
# Where the token table sits in a CLIPTextModel's params (and, under "text_model", in a CLIPModel's).
TOKEN_TABLE = ("text_model", "embeddings", "token_embedding", "embedding")


@dataclasses.dataclass(frozen=True)
class NewTokens:
    """Tokens added to a tokenizer: their strings, their ids (the rows they get) and, per token,
    the id whose row initialises theirs."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    init_ids: tuple[int, ...]
    old_vocab_size: int

    @property
    def new_vocab_size(self) -> int:
        return self.old_vocab_size + len(self.tokens)


def add_tokens(tokenizer, tokens: Sequence[str], init_words: Sequence[str] | None, *, vocab_size: int | None = None):
    """Returns (a copy of `tokenizer` that knows `tokens`, NewTokens).

    `init_words[i]` initialises `tokens[i]`; each must tokenize to exactly one token (None: the
    rows come from elsewhere, e.g. a saved embedding; init_ids are then -1). `vocab_size`
    (the token table's rows) defaults to the tokenizer's size; they must agree, so that the new
    ids are the rows `grow_embeddings` appends. Raises ValueError naming the offending token.
    """
    tokens = tuple(tokens)
    init_words = tuple(init_words) if init_words is not None else (None,) * len(tokens)
    if not tokens:
        raise ValueError("add_tokens: no tokens given")
    if len(tokens) != len(init_words):
        raise ValueError(f"add_tokens: {len(tokens)} tokens but {len(init_words)} initialiser words")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"add_tokens: a token is given twice in {list(tokens)}")
    old_size = len(tokenizer)
    if vocab_size is not None and vocab_size != old_size:
        raise ValueError(
            f"add_tokens: the tokenizer has {old_size} tokens but the embedding table {vocab_size} rows; "
            "new ids would not be the new rows"
        )
    vocabulary = tokenizer.get_vocab()
    for token in tokens:
        if token in vocabulary or not token.strip():
            raise ValueError(f"add_tokens: {token!r} is already a token of the tokenizer (or blank); pick another")
    init_ids = tuple(-1 if word is None else _single_token_id(tokenizer, word) for word in init_words)
    grown = copy.deepcopy(tokenizer)
    added = grown.add_tokens(list(tokens))
    ids = tuple(grown.convert_tokens_to_ids(list(tokens)))
    if added != len(tokens) or ids != tuple(range(old_size, old_size + len(tokens))):
        raise ValueError(f"add_tokens: the tokenizer gave {list(tokens)} the ids {list(ids)}, not the next rows")
    return grown, NewTokens(tokens, ids, init_ids, old_size)


def _single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"add_tokens: the initialiser word {word!r} is {len(ids)} tokens for this tokenizer; it must be one"
        )
    return int(ids[0])


def _flat_with_table(tree: Params, table: Sequence[str], what: str, caller: str):
    """Returns (the flattened `tree`, the table's path), raising ValueError naming `caller` when
    `tree` has no leaf at `table`."""
    flat, table = traverse_util.flatten_dict(tree), tuple(table)
    if table not in flat:
        raise ValueError(f"{caller}: no token table at {'/'.join(table)} in the {what}")
    return flat, table


def grow_embeddings(params: Params, new: NewTokens, *, table: Sequence[str] = TOKEN_TABLE) -> Params:
    """Returns `params` with `new.tokens`' rows appended to the token table at `table`, each a copy
    of its initialiser's row (same dtype and sharding as the table)."""
    flat, table = _flat_with_table(params, table, "params", "grow_embeddings")
    rows = flat[table]
    if rows.shape[0] != new.old_vocab_size:
        raise ValueError(
            f"grow_embeddings: the table has {rows.shape[0]} rows, the tokens were added to a vocabulary of "
            f"{new.old_vocab_size}"
        )
    flat[table] = jnp.concatenate([rows, rows[jnp.asarray(new.init_ids)]], axis=0)
    return traverse_util.unflatten_dict(flat)


def grown_model(model, new: NewTokens):
    """Returns the CLIP text module `model` (ClipTextModel or ClipTextTransformer) with room for
    the new tokens: its config's vocab_size is `new.new_vocab_size`."""
    if model.config.vocab_size != new.old_vocab_size:
        raise ValueError(
            f"grown_model: the model's vocab_size is {model.config.vocab_size}, the tokens were added to "
            f"{new.old_vocab_size}"
        )
    return model.clone(config=dataclasses.replace(model.config, vocab_size=new.new_vocab_size))


NEW_TOKENS, FROZEN = "new_tokens", "frozen"


def optimizer_labels(params: Params, *, table: Sequence[str] = TOKEN_TABLE) -> Params:
    """Returns a tree like `params` of labels for optax.multi_transform: NEW_TOKENS on the token
    table, FROZEN everywhere else, e.g.

        optax.multi_transform({NEW_TOKENS: optax.adamw(lr), FROZEN: optax.set_to_zero()}, labels)

    The table's old rows still get updates from that; `freeze_old_rows` removes them."""
    flat, table = _flat_with_table(params, table, "params", "optimizer_labels")
    return traverse_util.unflatten_dict({k: NEW_TOKENS if k == table else FROZEN for k in flat})


def freeze_old_rows(updates: Params, new: NewTokens, *, table: Sequence[str] = TOKEN_TABLE) -> Params:
    """Returns `updates` (gradients or optimizer updates) with the token table's rows other than
    `new`'s set to zero; every other leaf is left as it is. Apply it to the optimizer's updates,
    not only to the gradients, so that weight decay or momentum cannot move the old rows."""
    flat, table = _flat_with_table(updates, table, "updates", "freeze_old_rows")
    rows = flat[table]
    if rows.shape[0] != new.new_vocab_size:
        raise ValueError(f"freeze_old_rows: the table has {rows.shape[0]} rows, expected {new.new_vocab_size}")
    keep = (jnp.arange(rows.shape[0]) >= new.old_vocab_size)[:, None]
    flat[table] = jnp.where(keep, rows, jnp.zeros_like(rows))
    return traverse_util.unflatten_dict(flat)
