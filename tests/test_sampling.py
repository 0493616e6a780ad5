"""KV-cache sampler: greedy equals transformers' generate; log-probs equal re-scoring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.hf_fixtures import make_hf_model, save_hf_model
from vcppo_jax import models, sampling
from vcppo_jax.models import hf
from vcppo_jax.sampling import SamplingParams


@pytest.fixture(scope="module", params=("llama3", "qwen2"))
def model_pair(request, tmp_path_factory):
    model = make_hf_model(request.param, seed=1)
    path = save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))
    config, params = hf.load_checkpoint(path)
    return model, config, params


def test_blockwise_prompt_pass_generates_as_transformers(model_pair):
    """The prompt pass through blockwise attention (ragged prompts over the cache's slots)."""
    test_greedy_equals_transformers_generate(model_pair, attention="blockwise")


def test_cudnn_prompt_pass_and_decode_generate_as_transformers(model_pair, monkeypatch):
    """``attention="cudnn"`` reads the KV cache through cuDNN in the prompt pass and in every
    decode step (``attention.cudnn_cached``); here with the kernel emulated in plain JAX
    (``tests/test_attention.py``), so that the lengths and layouts the model hands it are
    checked anywhere. The real kernel is tested on a GPU in ``tests/test_attention.py``."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    from tests.test_attention import emulated_cudnn_attention

    monkeypatch.setattr(fa, "dot_product_attention", emulated_cudnn_attention)
    try:
        test_greedy_equals_transformers_generate(model_pair, attention="cudnn")
    finally:
        jax.clear_caches()  # No program traced with the emulation outlives the test.


def ragged_prompts(seed, lengths, vocab=101):
    rng = np.random.default_rng(seed)
    prompts = np.zeros((len(lengths), max(lengths)), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(0, vocab, n)
    return prompts, np.asarray(lengths)


def test_greedy_equals_transformers_generate(model_pair, attention="xla"):
    model, config, params = model_pair
    config = dataclasses.replace(config, attention=attention)
    prompts, lengths = ragged_prompts(0, [5, 11, 2, 8])
    n = 40
    out = sampling.generate(
        config,
        params,
        prompts,
        lengths,
        SamplingParams(max_new_tokens=n, temperature=0.0),
        jax.random.key(0),
    )
    assert out.response_tokens.shape == (4, n)
    np.testing.assert_array_equal(np.asarray(out.response_lengths), n)
    for i, length in enumerate(lengths):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor(prompts[i : i + 1, :length], dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
        np.testing.assert_array_equal(np.asarray(out.response_tokens[i]), ref[0, length:].numpy())
        # The buffer holds prompt then response from slot 0.
        row = np.asarray(out.tokens[i, : length + n])
        np.testing.assert_array_equal(row, ref[0].numpy())


def test_logprobs_match_rescoring_at_temperature_one(model_pair):
    _, config, params = model_pair
    prompts, lengths = ragged_prompts(1, [3, 9, 6])
    eos = (7,)
    out = sampling.generate(
        config,
        params,
        prompts,
        lengths,
        SamplingParams(max_new_tokens=48, temperature=1.0, eos_ids=eos),
        jax.random.key(3),
    )
    rescored = models.token_logprobs(config, params, out.tokens)
    pos = jnp.minimum(sampling.response_positions(out), out.tokens.shape[1] - 1)
    want = jnp.take_along_axis(rescored, pos, axis=1) * out.response_mask
    np.testing.assert_allclose(np.asarray(out.response_logprobs), np.asarray(want), atol=1e-5)
    # Masks come from positions: real tokens up to and including EOS, nothing after.
    mask = np.asarray(out.response_mask)
    toks = np.asarray(out.response_tokens)
    for i in range(3):
        n = int(out.response_lengths[i])
        assert mask[i, :n].all() and not mask[i, n:].any()
        if n < 48:
            assert toks[i, n - 1] in eos and not np.isin(toks[i, : n - 1], eos).any()


def test_stops_at_eos():
    config = models.ModelConfig(
        vocab_size=12,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    params = models.init_params(config, jax.random.key(0))
    prompts, lengths = ragged_prompts(2, [4, 2, 3], vocab=12)
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    free = sampling.generate(config, params, prompts, lengths, greedy, jax.random.key(0))
    eos = int(free.response_tokens[0, 0])  # Row 0's first greedy token becomes EOS.
    stop = SamplingParams(max_new_tokens=20, temperature=0.0, eos_ids=(eos,), pad_id=0)
    out = sampling.generate(config, params, prompts, lengths, stop, jax.random.key(0))
    toks, free_toks = np.asarray(out.response_tokens), np.asarray(free.response_tokens)
    assert int(out.response_lengths[0]) == 1 and toks[0, 0] == eos
    assert (toks[0, 1:] == 0).all()
    for i in (1, 2):  # Other rows: the free-running tokens, cut just after their first EOS.
        hits = np.nonzero(free_toks[i] == eos)[0]
        n = int(hits[0]) + 1 if len(hits) else 20
        assert int(out.response_lengths[i]) == n
        np.testing.assert_array_equal(toks[i, :n], free_toks[i, :n])


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    neg = jnp.finfo(jnp.float32).min
    k2 = sampling.filter_logits(logits, SamplingParams(max_new_tokens=1, top_k=2))
    assert (np.asarray(k2[0, 2:]) == neg).all() and (np.asarray(k2[0, :2]) > neg).all()
    # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (0.15) is needed too.
    p8 = sampling.filter_logits(logits, SamplingParams(max_new_tokens=1, top_p=0.8))
    kept = np.asarray(p8[0] > neg)
    np.testing.assert_array_equal(kept, [True, True, True, False, False])
    p3 = sampling.filter_logits(logits, SamplingParams(max_new_tokens=1, top_p=0.3))
    np.testing.assert_array_equal(np.asarray(p3[0] > neg), [True, False, False, False, False])
    t2 = sampling.filter_logits(logits, SamplingParams(max_new_tokens=1, temperature=2.0))
    np.testing.assert_allclose(np.asarray(t2), np.asarray(logits) / 2, rtol=1e-6)


def test_sampling_frequencies_follow_filtered_distribution():
    config = models.ModelConfig(
        vocab_size=6, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=1, num_kv_heads=1
    )
    params = models.init_params(config, jax.random.key(1))
    prompts = np.ones((2000, 1), np.int32)
    sp = SamplingParams(max_new_tokens=1, top_k=3, temperature=0.8)
    out = sampling.generate(config, params, prompts, np.ones(2000), sp, jax.random.key(5))
    logits = models.forward(config, params, jnp.ones((1, 1), jnp.int32))[0, -1]
    p = np.asarray(jax.nn.softmax(sampling.filter_logits(logits[None], sp)[0]))
    freq = np.bincount(np.asarray(out.response_tokens[:, 0]), minlength=6) / 2000
    assert (freq[p == 0] == 0).all()
    np.testing.assert_allclose(freq, p, atol=0.04)


def test_ids_past_the_tokenizer_are_never_sampled():
    """``vocab_limit``: a model whose table is larger than its tokenizer (the runner rounds it
    up to a multiple of 8) must never emit the extra ids, which no tokenizer can decode. With
    the extra ids made likely, the masked sampler never picks them, greedy or sampled, and
    every token the unmasked sampler drew from the valid ids is drawn alike (Gumbel-max over
    the same noise), so runs that never met an extra id repeat exactly."""
    config = models.ModelConfig(
        vocab_size=8, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=1, num_kv_heads=1
    )
    params = models.init_params(config, jax.random.key(3))
    kernel = np.asarray(params["lm_head"]).copy()
    kernel[:, 6:] = 0.0
    params = dict(params, lm_head=jnp.asarray(kernel))
    prompts = np.ones((400, 1), np.int32)
    lengths = np.ones(400)
    logits = models.forward(config, params, jnp.ones((1, 1), jnp.int32))[0, -1]
    p = np.asarray(jax.nn.softmax(logits))
    assert p[6:].sum() > 0.05  # The extra ids are likely enough to be drawn unmasked.
    for temperature in (1.0, 0.0):
        free = SamplingParams(max_new_tokens=3, temperature=temperature)
        limited = dataclasses.replace(free, vocab_limit=6)
        a = sampling.generate(config, params, prompts, lengths, free, jax.random.key(7))
        b = sampling.generate(config, params, prompts, lengths, limited, jax.random.key(7))
        ta, tb = np.asarray(a.response_tokens), np.asarray(b.response_tokens)
        assert tb.max() < 6
        if temperature:
            assert (ta >= 6).any()
            # Where the free sampler drew valid ids all along, the limited one drew the same.
            clean = (ta < 6).all(axis=1)
            assert clean.sum() > 50
            np.testing.assert_array_equal(ta[clean], tb[clean])
            # Log-probs are those of the renormalised distribution over the valid ids.
            first = np.asarray(b.response_logprobs[:, 0])
            want = np.log(p[tb[:, 0]] / p[:6].sum())
            np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_limit"):
        SamplingParams(max_new_tokens=1, vocab_limit=-1)


def test_no_recompile_within_a_bucket():
    config = models.ModelConfig(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    params = models.init_params(config, jax.random.key(2))
    sp = SamplingParams(max_new_tokens=5)
    prompts, lengths = ragged_prompts(3, [3, 7], vocab=20)
    sampling.generate(config, params, prompts, lengths, sp, jax.random.key(0))
    sizes = (sampling.prefill._cache_size(), sampling.decode._cache_size())
    for seed, lens in ((4, [1, 12]), (5, [16, 2]), (6, [9, 9])):
        prompts, lengths = ragged_prompts(seed, lens, vocab=20)
        sampling.generate(config, params, prompts, lengths, sp, jax.random.key(seed))
    assert (sampling.prefill._cache_size(), sampling.decode._cache_size()) == sizes


def test_bad_inputs():
    config = models.ModelConfig(
        vocab_size=20,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    params = models.init_params(config, jax.random.key(2))
    sp = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        sampling.generate(config, params, np.ones((2, 3)), np.array([0, 3]), sp, jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\)"):
        sampling.generate(config, params, np.full((1, 3), 25), np.array([3]), sp, jax.random.key(0))
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(max_new_tokens=2, top_p=1.5)


def test_prompt_buckets():
    """Powers of two up to 32 tokens, then steps of 32 (a long prompt is not padded to twice
    its length)."""
    got = [sampling.bucket_length(n) for n in (1, 12, 16, 17, 32, 33, 72, 96, 130)]
    assert got == [16, 16, 16, 32, 32, 64, 96, 96, 160]
