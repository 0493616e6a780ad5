"""Ids past the tokenizer get no probability in training (ModelConfig.vocab_limit), checked
against a NumPy softmax over the first ids only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcppo_jax import models
from vcppo_jax.models import ModelConfig
from vcppo_jax.models.logprobs import chunked_logprobs


def _np_reference(hidden, targets, kernel, limit, temperature):
    logits = np.einsum("bte,ev->btv", hidden, kernel) / temperature
    logits = logits[..., :limit]
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    logp = np.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
    return logp, -(p * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [3, 16])
def test_chunked_logprobs_leave_out_ids_past_the_limit(chunk):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 7, 5)).astype(np.float32)
    kernel = rng.normal(size=(5, 11)).astype(np.float32)
    kernel[:, 9:] += 3.0  # Much mass on the two unused ids, were they counted.
    targets = rng.integers(0, 9, size=(2, 7))
    logp, ent = chunked_logprobs(
        hidden, targets, kernel, 0.7, chunk_size=chunk, with_entropy=True, vocab_limit=9
    )
    ref_logp, ref_ent = _np_reference(hidden, targets, kernel, 9, 0.7)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
    # Unmasked, the same call differs (the extra ids hold mass).
    free, _ = chunked_logprobs(hidden, targets, kernel, 0.7, chunk_size=chunk)
    assert np.max(np.abs(np.asarray(free) - ref_logp)) > 0.1
    # The unused ids' kernel columns get no gradient, and nothing is NaN.
    grad = jax.grad(
        lambda k: (
            chunked_logprobs(
                hidden, targets, k, 0.7, chunk_size=chunk, with_entropy=True, vocab_limit=9
            )[1].sum()
            + chunked_logprobs(hidden, targets, k, 0.7, chunk_size=chunk, vocab_limit=9)[0].sum()
        )
    )(jnp.asarray(kernel))
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[:, 9:] == 0.0)
    assert np.any(np.asarray(grad)[:, :9] != 0.0)


def _tiny(vocab_limit=0):
    return ModelConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        vocab_limit=vocab_limit,
    )


def test_model_log_probs_and_logits_respect_the_limit():
    full, limited = _tiny(), _tiny(13)
    params = models.init_params(full, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, size=(2, 6)))
    logits = np.asarray(models.forward(full, params, tokens))
    shifted = logits[:, :-1, :13] - logits[:, :-1, :13].max(-1, keepdims=True)
    ref = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ref = np.take_along_axis(ref, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    logp, ent = models.token_logprobs(limited, params, tokens, with_entropy=True)
    np.testing.assert_allclose(np.asarray(logp)[:, 1:], ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(ent)))
    masked = np.asarray(models.forward(limited, params, tokens))
    np.testing.assert_array_equal(masked[..., :13], logits[..., :13])
    assert np.all(masked[..., 13:] == np.finfo(np.float32).min)
    # Unset (0), nothing changes.
    np.testing.assert_array_equal(
        np.asarray(models.token_logprobs(_tiny(0), params, tokens)),
        np.asarray(models.token_logprobs(full, params, tokens)),
    )


def test_a_bad_vocab_limit_is_refused_by_name():
    with pytest.raises(ValueError, match="vocab_limit=17"):
        _tiny(17)
    with pytest.raises(ValueError, match="vocab_limit=-1"):
        _tiny(-1)
