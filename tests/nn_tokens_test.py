"""Growing a CLIP text tower's vocabulary (gal_jax.nn.tokens) against transformers' add_tokens +
resize_token_embeddings on a tiny random text encoder with the real CLIP vocabulary."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import traverse_util

from gal_jax import models, tiny
from gal_jax.nn import clip, tokens

TEXT = dict(tiny.TINY_TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
PROMPTS = ["a photo of a <sks> cat on the beach", "a <sks> and a <olis> at night", "a photo of a cat"]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """(folder holding a tiny CLIPTextModel and the real CLIP tokenizer, the torch model)."""
    folder = tmp_path_factory.mktemp("text_encoder")
    torch.manual_seed(0)
    torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)).eval()
    torch_model.save_pretrained(folder, safe_serialization=True)
    tiny.write_tokenizer(folder)
    return folder, torch_model


def test_grown_tower_matches_transformers_after_add_tokens_and_resize(text_encoder):
    folder, torch_model = text_encoder
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    model, params = clip.load(folder)
    grown_tokenizer, new = tokens.add_tokens(tokenizer, ["<sks>", "<olis>"], ["cat", "dog"],
                                             vocab_size=model.config.vocab_size)
    assert new.ids == (49408, 49409) and len(tokenizer) == 49408  # the original is left alone
    assert new.init_ids == tuple(tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"]))
    model, params = tokens.grown_model(model, new), tokens.grow_embeddings(params, new)

    theirs_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    theirs_tokenizer.add_tokens(["<sks>", "<olis>"])
    torch_model.resize_token_embeddings(len(theirs_tokenizer))
    with torch.no_grad():
        table = torch_model.get_input_embeddings().weight
        table[new.ids[0]] = table[new.init_ids[0]]
        table[new.ids[1]] = table[new.init_ids[1]]
    ids = models.tokenize(grown_tokenizer, PROMPTS)
    np.testing.assert_array_equal(ids, models.tokenize(theirs_tokenizer, PROMPTS))
    assert new.ids[0] in ids[0] and new.ids[1] in ids[1]
    with torch.no_grad():
        expected = torch_model(input_ids=torch.from_numpy(ids).long())
    ours = model.apply({"params": params}, jnp.asarray(ids))
    scale = float(np.abs(expected.last_hidden_state.numpy()).max())
    assert float(np.abs(np.asarray(ours.last_hidden_state) - expected.last_hidden_state.numpy()).max()) <= 1e-5 * scale
    # Pooling finds end-of-text, not the largest id (the new tokens' ids are past it).
    np.testing.assert_allclose(np.asarray(ours.pooled_output), expected.pooler_output.numpy(), atol=1e-5 * scale)


def test_a_new_token_starts_as_its_word_and_moves_alone_when_trained(text_encoder):
    folder, _ = text_encoder
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    model, params = clip.load(folder)
    tokenizer, new = tokens.add_tokens(tokenizer, ["<sks>"], ["cat"])
    model, params = tokens.grown_model(model, new), tokens.grow_embeddings(params, new)
    with_token, with_word = models.tokenize(tokenizer, ["a <sks> on the moon", "a cat on the moon"])
    hidden = model.apply({"params": params}, jnp.asarray(np.stack([with_token, with_word]))).last_hidden_state
    np.testing.assert_allclose(np.asarray(hidden[0]), np.asarray(hidden[1]), atol=1e-6)

    optimizer = optax.multi_transform(
        {tokens.NEW_TOKENS: optax.adamw(0.1, weight_decay=0.5), tokens.FROZEN: optax.set_to_zero()},
        tokens.optimizer_labels(params))

    def loss(p):
        return jnp.sum(model.apply({"params": p}, jnp.asarray(with_token[None])).last_hidden_state ** 2)

    updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
    # Weight decay alone would move every row of the table; the freeze keeps the old ones.
    table_update = np.asarray(traverse_util.flatten_dict(updates)[tokens.TOKEN_TABLE])
    assert np.count_nonzero(np.any(table_update != 0, axis=1)) > len(new.ids)
    updates = tokens.freeze_old_rows(updates, new)
    trained = optax.apply_updates(params, updates)
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trained)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert changed == {tokens.TOKEN_TABLE}
    rows = np.flatnonzero(np.any(np.asarray(before[tokens.TOKEN_TABLE]) != np.asarray(after[tokens.TOKEN_TABLE]), 1))
    np.testing.assert_array_equal(rows, new.ids)


def test_bad_requests_are_refused_with_the_reason(text_encoder):
    folder, _ = text_encoder
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match="'cat</w>' is already a token"):
        tokens.add_tokens(tokenizer, ["cat</w>"], ["dog"])
    with pytest.raises(ValueError, match="initialiser word 'tea pot' is 2 tokens"):
        tokens.add_tokens(tokenizer, ["<sks>"], ["tea pot"])
    with pytest.raises(ValueError, match="1 tokens but 2 initialiser words"):
        tokens.add_tokens(tokenizer, ["<sks>"], ["cat", "dog"])
    with pytest.raises(ValueError, match="embedding table 49410 rows"):
        tokens.add_tokens(tokenizer, ["<sks>"], ["cat"], vocab_size=49410)
    _, new = tokens.add_tokens(tokenizer, ["<sks>"], ["cat"])
    model, params = clip.load(folder)
    grown = tokens.grow_embeddings(params, new)
    with pytest.raises(ValueError, match="table has 49409 rows"):
        tokens.grow_embeddings(grown, new)
    with pytest.raises(ValueError, match="no token table"):
        tokens.grow_embeddings({"text_model": {}}, new)
    with pytest.raises(ValueError, match="table has 49409 rows, expected 49410"):
        tokens.freeze_old_rows(grown, dataclasses.replace(new, old_vocab_size=49409))
    with pytest.raises(ValueError, match="no token table"):
        tokens.optimizer_labels({"text_model": {}})
    with pytest.raises(ValueError, match="vocab_size is 49409"):
        tokens.grown_model(tokens.grown_model(model, new), new)
