"""Architecture description shared by the decoder, the HF importer and the sampler."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# What a value model's head reads (``ModelConfig.value_inputs``).
VALUE_INPUTS = ("hidden", "hidden+likelihood")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama (2, 3.x) or Qwen2 / Qwen2.5 decoder.

    Frozen and hashable, so it can be a static argument of jitted functions.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # Default hidden_size // num_heads.
    rope_theta: float = 10000.0
    # Llama 3 scaling as a tuple of (key, value) pairs (hashable), e.g.
    # (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
    #  ("original_max_position_embeddings", 8192), ("rope_type", "llama3")).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k and v projections.
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    param_dtype: str = "float32"
    dtype: str = "float32"  # Compute dtype of activations; logits are always float32.
    remat: str = "none"  # "none", "full" (recompute each layer) or "dots" (save matmuls).
    # Attention of training, prompt and decode passes (models/attention.py): "xla" (scores
    # materialised), "blockwise" (memory linear in length), "cudnn" (GPU flash kernel),
    # "splash" (Pallas TPU flash kernel) or "auto" (cudnn on a GPU, blockwise there for
    # float32; splash on a TPU; else blockwise).
    attention: str = "xla"
    # What a value model's head reads (reward model and critic): "hidden" (the last hidden
    # state, a linear head: the usual value / reward head) or "hidden+likelihood" (that plus
    # a learned weight times the model's own log-likelihood of the token just read, through
    # its LM head: a departure from the usual reward model, for verifying long answers).
    value_inputs: str = "hidden"
    # Ids at or above this are never produced (0 = the whole table): their logits are left out
    # of every softmax the model forms (training log-probs, entropy, the likelihood a value
    # model reads, ``Transformer.logits``). A table is often larger than its tokenizer (rounded
    # up to a multiple of 8 here, padded in HF checkpoints); the runner sets this to the
    # tokenizer's size with ``model.mask_unused_vocab``, as the sampler masks those ids.
    vocab_limit: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {list(_DTYPES)}")
        if self.value_inputs not in VALUE_INPUTS:
            raise ValueError(f"value_inputs={self.value_inputs!r}; expected one of {VALUE_INPUTS}")
        from vcppo_jax.models.attention import IMPLEMENTATIONS

        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {IMPLEMENTATIONS}")
        if not 0 <= self.vocab_limit <= self.vocab_size:
            raise ValueError(
                f"vocab_limit={self.vocab_limit}: must lie in [0, vocab_size={self.vocab_size}] "
                "(0 = the whole table)"
            )
        if self.remat not in ("none", "full", "dots"):
            raise ValueError(f"remat={self.remat!r}; expected 'none', 'full' or 'dots'")

    @property
    def head_size(self) -> int:
        """Per-head dimension D: ``head_dim``, or ``hidden_size // num_heads`` when unset."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def jnp_param_dtype(self):
        """The jnp dtype parameters are stored in."""
        return _DTYPES[self.param_dtype]

    @property
    def jnp_dtype(self):
        """The jnp compute dtype of activations."""
        return _DTYPES[self.dtype]

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        """``rope_scaling`` as a dict, or None when there is no scaling."""
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every EOS token id, as a tuple (empty when none is set)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **kw) -> ModelConfig:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_fields(cls, m, vocab_size: int, **kw) -> ModelConfig:
        """The decoder a run's ``model.*`` config fields describe (no checkpoint), with a
        vocabulary of ``vocab_size`` rounded up to a multiple of 8; ``kw`` sets the rest."""
        return cls(
            vocab_size=-(-vocab_size // 8) * 8,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            param_dtype=m.param_dtype,
            dtype=m.dtype,
            remat=m.remat,
            attention=m.attention,
            rope_theta=float(m.rope_theta),
            value_inputs=m.get("value_inputs", "hidden"),
            **kw,
        )
