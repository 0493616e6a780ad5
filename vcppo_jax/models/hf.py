"""Hugging Face checkpoints (Llama, Qwen2) in and out: ``config.json`` + ``*.safetensors``.

``load_checkpoint(path) -> (ModelConfig, params)`` reads a single ``model.safetensors`` or a
sharded set with ``model.safetensors.index.json``, maps names onto this package's layout
(see ``vcppo_jax.models.transformer``), checks every shape, and refuses a missing or
unexpected tensor. ``save_checkpoint(path, config, params)`` writes a directory that
transformers loads; a round trip is lossless.

Both transformers 5 config files (``dtype``, ``rope_parameters``) and older ones
(``torch_dtype``, top-level ``rope_theta`` / ``rope_scaling``) are read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from vcppo_jax.models import abstract_params
from vcppo_jax.models import safetensors_io as st
from vcppo_jax.models.config import SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked."""


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a HF ``config.json`` dict (old or new field names), with
    ``overrides`` applied; unsupported architectures and features raise ``CheckpointError``."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} (architectures {archs}) is not supported; supported "
            f"model types: {SUPPORTED_MODEL_TYPES} ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise CheckpointError(
            f"architectures {unsupported} are not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    rope = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if hf.get("use_sliding_window"):
        raise CheckpointError("sliding-window attention (use_sliding_window=true) is not supported")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=(
            tuple(hf["eos_token_id"])
            if isinstance(hf.get("eos_token_id"), list)
            else hf.get("eos_token_id")
        ),
        pad_token_id=hf.get("pad_token_id"),
    )
    if fields["head_dim"] == fields["hidden_size"] // heads:
        fields["head_dim"] = None
    if model_type == "llama" and hf.get("mlp_bias"):
        raise CheckpointError("Llama with mlp_bias=true is not supported")
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``config``, with both the old and the new spellings of the
    dtype and rope fields."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
    rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling:
        rope.update(config.rope_scaling_dict)
    hf = {
        "architectures": [arch],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        # Both spellings, so that old and new transformers read the same model.
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling_dict,
        "rope_parameters": rope,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id)
        if isinstance(config.eos_token_id, tuple)
        else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    if config.model_type == "llama":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = False
    else:
        hf["use_sliding_window"] = False
    return hf


# ---------------------------------------------------------------------------------------------
# Tensor names and layouts
# ---------------------------------------------------------------------------------------------


def _name_map(config: ModelConfig, head: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """HF tensor name -> (path in our params, transform kind)."""
    m: dict[str, tuple[tuple[str, ...], str]] = {
        "model.embed_tokens.weight": (("decoder", "embed", "embedding"), "same"),
        "model.norm.weight": (("decoder", "final_norm", "scale"), "same"),
    }
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", ("decoder", f"layers_{i}")
        for p in ("q", "k", "v"):
            m[hf + f"self_attn.{p}_proj.weight"] = (ours + ("attn", f"{p}_proj", "kernel"), "qkv")
            if config.qkv_bias:
                m[hf + f"self_attn.{p}_proj.bias"] = (ours + ("attn", f"{p}_proj", "bias"), "bias")
        m[hf + "self_attn.o_proj.weight"] = (ours + ("attn", "o_proj", "kernel"), "o")
        for p in ("gate", "up", "down"):
            m[hf + f"mlp.{p}_proj.weight"] = (ours + ("mlp", f"{p}_proj", "kernel"), "t")
        m[hf + "input_layernorm.weight"] = (ours + ("input_norm", "scale"), "same")
        m[hf + "post_attention_layernorm.weight"] = (
            ours + ("post_attention_norm", "scale"),
            "same",
        )
    if head == "lm" and not config.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), "t")
    if head == "value" and config.value_inputs != "hidden":
        raise NotImplementedError(
            f"value_inputs={config.value_inputs!r}: a HF sequence-classification model has no "
            "such head; only value models with value_inputs='hidden' convert"
        )
    if head == "value":
        m["score.weight"] = (("value_head", "kernel"), "t")
        m["score.bias"] = (("value_head", "bias"), "same")
    return m


def _to_ours(kind: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "same":
        return w.reshape(shape)
    if kind == "t":
        return w.T
    if kind == "qkv":  # [H*D, E] -> [E, H, D]
        return w.T.reshape(shape)
    if kind == "bias":  # [H*D] -> [H, D]
        return w.reshape(shape)
    if kind == "o":  # [E, H*D] -> [H, D, E]
        return w.T.reshape(shape)
    raise AssertionError(kind)


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "t":
        return w.T
    if kind == "qkv":  # [E, H, D] -> [H*D, E]
        return w.reshape(w.shape[0], -1).T
    if kind == "bias":
        return w.reshape(-1)
    if kind == "o":  # [H, D, E] -> [E, H*D]
        return w.reshape(-1, w.shape[-1]).T
    raise AssertionError(kind)


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return _to_hf(kind, np.empty(shape, np.uint8)).shape


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Load / save
# ---------------------------------------------------------------------------------------------


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no index)")
    out = [os.path.join(path, f) for f in files]
    missing = [f for f in out if not os.path.exists(f)]
    if missing:
        raise CheckpointError(f"{path}: the index names files that are missing: {missing}")
    return out


def load_checkpoint(path: str, *, head: str = "lm", **config_overrides):
    """Reads a HF Llama / Qwen2 directory -> ``(ModelConfig, params)``.

    ``config_overrides`` set ModelConfig fields (e.g. ``param_dtype="bfloat16"``,
    ``remat="full"``); parameters are stored in ``param_dtype`` (float32 by default).
    ``head="value"`` loads a critic (``score.weight`` / ``score.bias``).
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json (is this a HF model directory?)")
    try:
        with open(cfg_path) as f:
            hf_config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    try:
        config = config_from_hf(hf_config, **config_overrides)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path}: missing field {e}") from e

    shapes, _ = abstract_params(config, head)
    names = _name_map(config, head)
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        try:
            tensors.update(st.load(file))
        except st.SafetensorsError as e:
            raise CheckpointError(str(e)) from e
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # Some writers store the tied copy too.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(names) - set(tensors))
    unexpected = sorted(set(tensors) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match a {config.model_type} model with "
            f"{config.num_layers} layers: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    dtype = config.jnp_param_dtype
    params: dict = {}
    for name, (ours, kind) in names.items():
        want = _get(shapes, ours).shape
        w = tensors[name]
        if w.shape != _hf_shape(kind, want):
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(w.shape)}, expected "
                f"{list(_hf_shape(kind, want))} from config.json"
            )
        finite = np.isfinite(w)
        if not finite.all():
            raise CheckpointError(
                f"{path}: tensor {name} holds {int((~finite).sum())} non-finite value(s) "
                "(NaN or inf): the checkpoint is damaged or diverged"
            )
        _set(params, ours, np.asarray(_to_ours(kind, w, want), dtype=dtype))
    params = jax.tree.map(jax.numpy.asarray, params)
    return config, params


def save_checkpoint(
    path: str, config: ModelConfig, params, *, head: str = "lm", max_shard_bytes: int | None = None
) -> None:
    """Writes ``config.json`` and safetensors (sharded with an index past ``max_shard_bytes``)."""
    os.makedirs(path, exist_ok=True)
    names = _name_map(config, head)
    tensors = {}
    for name, (ours, kind) in names.items():
        w = np.asarray(jax.device_get(_get(params, ours)))
        tensors[name] = np.ascontiguousarray(_to_hf(kind, w))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        st.save(os.path.join(path, "model.safetensors"), tensors, meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.save(os.path.join(path, fname), shard, meta)
        weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
