"""Per-device memory plan for a config, from shapes alone (``jax.eval_shape``; nothing is
allocated, no device of that size is needed).

    python -m experiments.memory_plan --config=configs/vcppo.py:qwen2.5-32b --devices 256

Counts, per device, under the config's mesh and logical-axis rules: policy, critic and
reference parameters; both optimiser states (as optax creates them); the KV cache of one
rollout batch; the activations kept for the backward pass with per-layer remat (one
``[B, T, E]`` residual per layer plus one layer's working set); one chunk of the log-probs'
float32 logits and its gradient; one update's gradients; under FSDP, the LM head gathered for
the log-probs and the embedding table gathered for the lookup, with their gradients; and one
layer's attention
working memory with the kernel ``model.attention`` stands for on ``--backend`` (xla: the
float32 scores and the probabilities, ``[B, H, T, T]``; blockwise: one key block of them,
``[B, H, T, 512]``, and the float32 accumulator; cudnn and splash: the saved float32
log-sum-exp ``[B, H, T]``, the kernel's tiles living on chip). The model shape is Qwen2.5-32B's (64
layers, hidden 5120, MLP 27648, 40 heads / 8 KV heads, vocabulary 152,064) when the config
loads a checkpoint (``model.hf_path``: the pod variants), and the config's own ``model.*``
shape otherwise (``small``, ``tiny``: the synthetic task, whose prompts are at most
``prompt_budget`` tokens). Without remat (``model.remat="none"``) every layer's working set is
kept for the backward pass, not one.

    python -m experiments.memory_plan --config=configs/vcppo.py:small --devices 1
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from vcppo_jax import models, sharding, train_state
from vcppo_jax.models import ModelConfig
from vcppo_jax.models import attention as attention_lib

QWEN25_32B = ModelConfig(
    vocab_size=152064,
    hidden_size=5120,
    intermediate_size=27648,
    num_layers=64,
    num_heads=40,
    num_kv_heads=8,
    qkv_bias=True,
    rope_theta=1e6,
    model_type="qwen2",
    param_dtype="bfloat16",
    dtype="bfloat16",
    remat="full",
    max_position_embeddings=32768,
)


def shard_bytes(tree, specs, mesh_shape: dict[str, int], rules) -> int:
    """Bytes on one device: each leaf's dimensions divided by the mesh axes its spec names."""
    total = 0
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: x is None or hasattr(x, "index"))
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        pspec = sharding.logical_to_spec(tuple(spec) if spec is not None else None, rules)
        n = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        for axes in pspec:
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            n //= math.prod(mesh_shape[a] for a in axes)
        total += n
    return total


def attention_bytes(kind: str, b: int, heads: int, t: int, head_size: int) -> int:
    """One layer's attention working memory for ``b`` sequences of ``t`` tokens."""
    if kind == "xla":
        return b * heads * t * t * (4 + 2)
    if kind == "blockwise":
        block = min(t, attention_lib.DEFAULT_BLOCK)
        return b * heads * t * (block * (4 + 2) + head_size * 4 + 8)
    if kind in ("cudnn", "splash"):  # Flash kernels: tiles on chip, the log-sum-exp saved.
        return b * heads * t * 4
    raise ValueError(f"no memory model for attention={kind!r}")


def model_shape(config) -> ModelConfig:
    """The model the plan counts: Qwen2.5-32B for a checkpoint, else the config's own shape."""
    m = config.model
    if m.hf_path:
        return QWEN25_32B
    return ModelConfig.from_fields(m, config.data.tokenizer_vocab_size)


def default_prompt_budget(config) -> int:
    """Prompt tokens counted per sequence: 1024 for a checkpoint's prompts, 256 for the
    synthetic task's."""
    return 1024 if config.model.hf_path else 256


def plan(
    config, devices: int, backend: str = "gpu", prompt_budget: int | None = None
) -> dict[str, float]:
    """Bytes per device by item (keys starting with "_" describe the plan). ``prompt_budget``:
    the prompt tokens counted per sequence (default 1024 for a checkpoint's prompts, 256 for
    the synthetic task's)."""
    mcfg = model_shape(config)
    if prompt_budget is None:
        prompt_budget = default_prompt_budget(config)
    abytes = jnp.dtype(mcfg.dtype).itemsize
    mesh_shape = sharding.mesh_shape({a: config.mesh[a] for a in sharding.MESH_AXES}, devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    out = {}
    tx = train_state.make_optimizer(1e-6)
    for head, name in (("lm", "policy"), ("value", "critic")):
        shapes, specs = models.abstract_params(mcfg, head)
        out[f"{name} parameters"] = shard_bytes(shapes, specs, mesh_shape, rules)
        opt = jax.eval_shape(tx.init, shapes)
        # Optimiser moments mirror the parameters' shapes and shardings.
        out[f"{name} optimiser state"] = sum(
            shard_bytes(moment, specs, mesh_shape, rules) for moment in (opt[1][0].mu, opt[1][0].nu)
        )
    out["reference parameters"] = out["policy parameters"]
    batch_shards = math.prod(mesh_shape[a] for a in sharding.batch_axes(rules))
    b = max(1, config.rollout.prompts_per_step * config.rollout.samples_per_prompt // batch_shards)
    t = prompt_budget + config.rollout.max_new_tokens
    kv_shards = mesh_shape["tensor"] if mcfg.num_kv_heads % mesh_shape["tensor"] == 0 else 1
    out["KV cache (one rollout batch)"] = (
        2 * mcfg.num_layers * b * t * mcfg.num_kv_heads * mcfg.head_size * abytes // kv_shards
    )
    mb = max(1, b // config.ppo.minibatches)
    e = mcfg.hidden_size
    layer_set = mb * t * (4 * e + 3 * mcfg.intermediate_size // mesh_shape["tensor"]) * abytes
    # One layer's working set is live at a time under remat; without it every layer's is kept.
    kept = mcfg.num_layers if mcfg.remat == "none" else 1
    residuals = mcfg.num_layers * mb * t * e * abytes  # The stream at each layer boundary.
    what = "no remat: every layer's working set" if kept > 1 else "per-layer remat"
    out[f"activations ({what}, one minibatch)"] = residuals + kept * layer_set
    # The log-probs' float32 logits, one chunk of positions at a time (``chunked_logprobs``,
    # a chunk sized by what a device holds): the forward pass's, then the backward pass's
    # recomputed logits and their gradient.
    vocab_shards = mesh_shape["tensor"] if mcfg.vocab_size % mesh_shape["tensor"] == 0 else 1
    chunk = min(t, models.auto_chunk_size(mb, mcfg.vocab_size // vocab_shards))
    out["logits (float32, one chunk of positions, and its gradient)"] = (
        2 * mb * chunk * mcfg.vocab_size * 4 // vocab_shards
    )
    # One update's gradients, sharded as the parameters (the actor's and the critic's updates
    # do not overlap: the larger model's).
    out["gradients (one update)"] = max(out["policy parameters"], out["critic parameters"])
    # Where FSDP splits the LM head, the log-probs read it gathered over its ``embed`` axis
    # once for all chunks (``chunked_logprobs``), and its gradient builds up there.
    if math.prod(mesh_shape[a] for a in sharding.rule_axes("embed", rules)) > 1:
        head = e * mcfg.vocab_size * abytes // vocab_shards
        out["LM head gathered for the log-probs, and its gradient"] = 2 * head
        # And the embedding table, gathered the same way for the lookup in passes over many
        # tokens (the model's ``Decoder``), its gradient built up there: the actor's and the
        # critic's (a tied table is the LM head's, counted once).
        if not mcfg.tie_word_embeddings:
            out["embedding table gathered for the lookup, and its gradient"] = 2 * head
    kind = attention_lib.resolve(config.model.attention, backend, mcfg.dtype, mcfg.head_size)
    heads = mcfg.num_heads // mesh_shape["tensor"]
    where = "every layer" if kept > 1 else "one layer"
    out[f"attention working memory ({kind}, {where}, one minibatch)"] = kept * attention_bytes(
        kind, mb, heads, t, mcfg.head_size
    )
    out["_mesh"] = mesh_shape
    out["_per_device_batch"] = b
    return out


def load_config(spec: str):
    """``path/to/config.py:VARIANT`` (or just the path) -> that file's ``get_config(VARIANT)``."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/vcppo.py:qwen2.5-32b")
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument(
        "--backend", default="gpu", help="what model.attention=auto resolves on (gpu, tpu, cpu)"
    )
    parser.add_argument("--prompt_budget", type=int, default=None, help="prompt tokens counted")
    args = parser.parse_args()
    config = load_config(args.config)
    result = plan(config, args.devices, args.backend, args.prompt_budget)
    print(f"mesh {result.pop('_mesh')}, {result.pop('_per_device_batch')} sequences per device")
    total = 0
    for k, v in result.items():
        total += v
        print(f"  {k:66s} {v / 2**30:8.2f} GiB")
    print(f"  {'total per device':66s} {total / 2**30:8.2f} GiB")


if __name__ == "__main__":
    main()
