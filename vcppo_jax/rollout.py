"""Rollouts: the batch type, prompt/response encoding, sampling with answer checking, and the
rollout and route metrics.

A ``Batch`` holds sequences in the sampler's layout (``tokens [B, L]``: prompt, then response)
with their response-aligned views (``positions``, ``mask`` ``[B, N]``). Library code: it takes a
``ModelConfig``, a tokenizer and an answer checker, never the experiment config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from vcppo_jax import rewards, sampling
from vcppo_jax.data.synthetic import ANSWER_PREFIX
from vcppo_jax.models import ModelConfig
from vcppo_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Batch:
    """A set of sequences in sampler layout and their response-aligned views."""

    tokens: jax.Array  # [B, L]
    positions: jax.Array  # [B, N]
    mask: jax.Array  # [B, N] float32
    lengths: np.ndarray  # [B] response lengths
    sampler_logprobs: jax.Array | None = None  # [B, N], from the sampler, when sampled
    has_answer: np.ndarray | None = None  # [B] bool: an answer could be extracted
    direct: np.ndarray | None = None  # [B] bool: the short route (answer with no steps)
    ended: np.ndarray | None = None  # [B] bool: the response ends with an EOS, when sampled


def is_direct(text: str) -> bool:
    """A response that states the answer without writing any step (the short route)."""
    return text.strip().startswith(ANSWER_PREFIX)


def route_metrics(prefix: str, direct: np.ndarray, correct: np.ndarray) -> dict:
    """Share of short-route answers and the accuracy of each route (NaN-free: -1 if unused)."""
    acc = lambda sel: float(correct[sel].mean()) if sel.any() else -1.0
    return {
        f"{prefix}/direct_fraction": float(direct.mean()),
        f"{prefix}/accuracy_direct_route": acc(direct),
        f"{prefix}/accuracy_written_route": acc(~direct),
    }


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad: int) -> np.ndarray:
    """Token rows -> ``[len(rows), width]`` int32, right-padded with ``pad`` (cut at width)."""
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:width]
    return out


def encode_pairs(
    tokenizer: Tokenizer,
    prompts: list[str],
    responses: list[str],
    pad_multiple: int = 1,
    add_eos: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prompt/response pairs in sampler layout -> host arrays ``(tokens [B, L], positions
    [B, N], mask [B, N], response lengths [B])``; widths rounded up to ``pad_multiple`` (fewer
    distinct shapes, fewer compilations)."""
    tok = tokenizer
    p_ids = [tok.encode(tok.format_prompt(p), add_bos=True) for p in prompts]
    r_ids = [tok.encode(r, add_eos=add_eos) for r in responses]
    up = lambda x: -(-x // pad_multiple) * pad_multiple
    n = up(max(len(r) for r in r_ids))
    width = up(max(len(p) for p in p_ids) + n)
    tokens = pad_rows([p + r for p, r in zip(p_ids, r_ids, strict=True)], width, tok.pad_id)
    plen = np.array([len(p) for p in p_ids])
    rlen = np.array([len(r) for r in r_ids])
    positions = plen[:, None] + np.arange(n)[None, :]
    mask = (np.arange(n)[None, :] < rlen[:, None]).astype(np.float32)
    return tokens, positions, mask, rlen


def sample(
    model_config: ModelConfig,
    params,
    problems: Sequence,
    key: jax.Array,
    sampling_params: sampling.SamplingParams,
    tokenizer: Tokenizer,
    check: Callable[[list[str], Sequence], tuple[np.ndarray, dict]],
    to_host: Callable[[jax.Array], np.ndarray] = np.asarray,
    forced: list[list[int]] | None = None,
) -> tuple[Batch, dict, np.ndarray]:
    """Samples a response per problem (``problem.prompt``), decodes it and checks it with
    ``check(texts, problems) -> (correct [B] bool, metrics)``. ``forced``: response tokens
    written for the model before it continues (one list per problem); they are part of the
    checked text but not of the returned batch's response. ``to_host`` fetches a (possibly
    multi-process) array. Returns ``(batch, perf and check metrics, correct)``."""
    tok = tokenizer
    prompts, lengths = tok.encode_prompts([p.prompt for p in problems])
    if forced is not None:
        rows = [list(r[:n]) + f for r, n, f in zip(prompts, lengths, forced, strict=True)]
        lengths = np.array([len(r) for r in rows], np.int32)
        prompts = pad_rows(rows, int(lengths.max()), tok.pad_id)
    t0 = time.time()
    out = sampling.generate(model_config, params, prompts, lengths, sampling_params, key)
    jax.block_until_ready(out.response_tokens)
    seconds = time.time() - t0
    mask = to_host(out.response_mask)
    response = to_host(out.response_tokens)
    if forced is None:
        texts = tok.decode_batch(response, mask)
    else:  # Decoded as one piece: the text the model wrote, forced tokens included.
        texts = [
            tok.decode(f + r[m > 0].tolist())
            for f, r, m in zip(forced, response, mask, strict=True)
        ]
    correct, check_info = check(texts, problems)
    n = mask.sum(1).astype(int)
    last = response[np.arange(len(n)), np.maximum(n - 1, 0)]
    batch = Batch(
        out.tokens,
        sampling.response_positions(out),
        out.response_mask,
        n,
        out.response_logprobs,
        np.array([rewards.extract_answer(t) is not None for t in texts]),
        np.array([is_direct(t) for t in texts]),
        (n > 0) & np.isin(last, sampling_params.eos_ids),
    )
    gen = float(mask.sum())
    info = {
        "perf/sample_seconds": seconds,
        "perf/sample_tokens_per_s": gen / max(seconds, 1e-9),
        **check_info,
    }
    return batch, info, correct


def rollout_metrics(
    batch: Batch, correct: np.ndarray, token_rewards: np.ndarray, max_new_tokens: int
) -> dict:
    """Accuracy, length, reward, truncation and answer-format shares, and the routes, of one
    batch of sampled responses (``token_rewards [B, N]`` on the host)."""
    lengths = np.asarray(batch.lengths)
    truncated = lengths >= max_new_tokens
    if batch.ended is not None:
        truncated &= ~batch.ended
    return {
        "rollout/accuracy": float(np.mean(correct)),
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/reward_mean": float(token_rewards.sum(1).mean()),
        # Cut off at the limit: an EOS written as the last allowed token ended the response.
        "rollout/truncated_fraction": float(np.mean(truncated)),
        "rollout/no_answer_fraction": float(np.mean(~batch.has_answer)),
        **route_metrics("rollout", batch.direct, correct),
    }
