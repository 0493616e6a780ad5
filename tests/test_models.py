"""The decoder against HF transformers on tiny random Llama / Qwen2 models."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_fixtures import hf_logits, make_hf_model, save_hf_model
from vcppo_jax import models
from vcppo_jax.models import hf
from vcppo_jax.models.config import ModelConfig

KINDS = ("llama", "llama3", "qwen2")


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, model, path


def test_logits_match_transformers(checkpoint):
    kind, model, path = checkpoint
    config, params = hf.load_checkpoint(path)
    assert config.model_type == ("qwen2" if kind == "qwen2" else "llama")
    assert config.qkv_bias == (kind == "qwen2")
    assert config.tie_word_embeddings == (kind == "qwen2")
    assert (config.rope_scaling is not None) == (kind == "llama3")
    tokens = np.random.default_rng(0).integers(0, 101, size=(3, 150))  # Past the llama3 64.
    ours = np.asarray(models.forward(config, params, jnp.asarray(tokens)))
    ref = hf_logits(model, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_chunked_logprobs_equal_unchunked(checkpoint):
    _, model, path = checkpoint
    config, params = hf.load_checkpoint(path)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 101, size=(2, 37)))
    full = jax.nn.log_softmax(models.forward(config, params, tokens), axis=-1)
    want = jnp.take_along_axis(full[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    for chunk in (1, 5, 36, 512):
        got, ent = models.token_logprobs(
            config, params, tokens, chunk_size=chunk, with_entropy=True
        )
        np.testing.assert_allclose(np.asarray(got[:, 1:]), np.asarray(want), atol=2e-5)
        assert (np.asarray(got[:, 0]) == 0).all()
        want_ent = -jnp.sum(jnp.exp(full) * full, axis=-1)[:, :-1]
        np.testing.assert_allclose(np.asarray(ent[:, 1:]), np.asarray(want_ent), atol=2e-5)
    # Temperature divides the logits.
    hot = models.token_logprobs(config, params, tokens, temperature=0.7, chunk_size=8)
    full_t = jax.nn.log_softmax(models.forward(config, params, tokens) / 0.7, axis=-1)
    want_t = jnp.take_along_axis(full_t[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(hot[:, 1:]), np.asarray(want_t), atol=2e-5)


def test_chunked_logprobs_gradient_matches():
    config = ModelConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
    )
    params = models.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, size=(2, 20)))

    def unchunked(p):
        lp = jax.nn.log_softmax(models.forward(config, p, tokens), axis=-1)
        return jnp.sum(jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1))

    chunked = lambda p: jnp.sum(models.token_logprobs(config, p, tokens, chunk_size=6))
    g1, g2 = jax.grad(unchunked)(params), jax.grad(chunked)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_save_load_round_trip_is_lossless(checkpoint, tmp_path):
    kind, model, path = checkpoint
    config, params = hf.load_checkpoint(path)
    out = str(tmp_path / "out")
    hf.save_checkpoint(out, config, params, max_shard_bytes=20_000)  # Forces several shards.
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    config2, params2 = hf.load_checkpoint(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads what we wrote and computes the same logits.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(3).integers(0, 101, size=(2, 20))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-5)


def test_sharded_hf_checkpoint_loads(tmp_path):
    model = make_hf_model("llama")
    path = save_hf_model(model, str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    config, params = hf.load_checkpoint(path)
    tokens = np.random.default_rng(4).integers(0, 101, size=(1, 12))
    np.testing.assert_allclose(
        np.asarray(models.forward(config, params, jnp.asarray(tokens))),
        hf_logits(model, tokens),
        atol=1e-4,
    )


def test_old_style_config_fields(tmp_path):
    """Checkpoints from older transformers: torch_dtype, top-level rope_theta / rope_scaling."""
    model = make_hf_model("llama3")
    path = save_hf_model(model, str(tmp_path))
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    config, params = hf.load_checkpoint(path)
    assert config.rope_theta == 500000.0 and config.rope_scaling_dict["factor"] == 8.0
    tokens = np.random.default_rng(5).integers(0, 101, size=(1, 100))
    np.testing.assert_allclose(
        np.asarray(models.forward(config, params, jnp.asarray(tokens))),
        hf_logits(model, tokens),
        atol=1e-4,
    )


def test_load_errors_are_clear(tmp_path):
    model = make_hf_model("llama")
    path = save_hf_model(model, str(tmp_path / "m"))
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        good = json.load(f)

    def write(cfg):
        with open(cfg_file, "w") as f:
            json.dump(cfg, f)

    write({**good, "model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(hf.CheckpointError, match=r"model_type 'mistral'.*supported.*llama"):
        hf.load_checkpoint(path)
    write({**good, "num_hidden_layers": 3})  # A layer the file does not have.
    with pytest.raises(hf.CheckpointError, match=r"missing \['model.layers.2"):
        hf.load_checkpoint(path)
    write({**good, "num_hidden_layers": 1})
    with pytest.raises(hf.CheckpointError, match=r"unexpected \['model.layers.1"):
        hf.load_checkpoint(path)
    write({**good, "intermediate_size": 48})
    with pytest.raises(hf.CheckpointError, match=r"gate_proj.weight has shape \[64, 32\]"):
        hf.load_checkpoint(path)
    write(good)
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(hf.CheckpointError, match="truncated|outside the file"):
        hf.load_checkpoint(path)
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.load_checkpoint(str(tmp_path))


def test_value_head_and_bfloat16():
    config = ModelConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    critic = models.init_params(config, jax.random.key(1), head="value")
    assert "value_head" in critic and "lm_head" not in critic
    tokens = jnp.ones((2, 9), jnp.int32)
    vals = models.values(config, critic, tokens)
    assert vals.shape == (2, 9) and vals.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(vals), 0.0)  # A fresh head starts at zero.
    actor = models.init_params(config, jax.random.key(1))
    logits = models.forward(config, actor, tokens)
    assert logits.dtype == jnp.float32 and jnp.isfinite(logits).all()


def test_remat_gives_same_gradients():
    base = ModelConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
    )
    params = models.init_params(base, jax.random.key(2))
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, 30, size=(2, 10)))
    grads = []
    for remat in ("none", "full", "dots"):
        cfg = base.replace(remat=remat)
        grads.append(
            jax.grad(lambda p, c=cfg: jnp.sum(models.token_logprobs(c, p, tokens)))(params)
        )
    for g in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig(
            vocab_size=1,
            hidden_size=4,
            intermediate_size=4,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            model_type="gpt2",
        )
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        ModelConfig(
            vocab_size=1,
            hidden_size=4,
            intermediate_size=4,
            num_layers=1,
            num_heads=4,
            num_kv_heads=3,
        )


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    from vcppo_jax.models import safetensors_io as st

    path = save_hf_model(make_hf_model("llama"), str(tmp_path / "m"))
    weights = os.path.join(path, "model.safetensors")
    tensors = st.load(weights)
    bad = "model.layers.0.mlp.up_proj.weight"
    tensors[bad] = tensors[bad].copy()
    tensors[bad][0, :3] = [np.nan, np.inf, -np.inf]
    st.save(weights, tensors, {"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=rf"{bad} holds 3 non-finite value\(s\)"):
        hf.load_checkpoint(path)


@pytest.mark.parametrize("tied", [False, True])
def test_value_head_reading_its_likelihood_matches_a_numpy_reference(tied):
    """value_inputs="hidden+likelihood": the value at slot t is the linear head on the hidden
    state plus w times log p(token t | tokens < t) under the model's own LM head; checked
    against a NumPy log-softmax of the actor's logits on the same weights."""
    base = ModelConfig(
        vocab_size=24,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=tied,
    )
    config = base.replace(value_inputs="hidden+likelihood")
    critic = models.init_params(config, jax.random.key(3), head="value")
    assert ("lm_head" in critic) != tied and float(critic["likelihood_weight"]) == 0.0
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 24, size=(3, 11)))
    plain = {k: v for k, v in critic.items() if k not in ("lm_head", "likelihood_weight")}
    # A fresh weight of 0 leaves the plain head's values.
    np.testing.assert_allclose(
        np.asarray(models.values(config, critic, tokens)),
        np.asarray(models.values(base, plain, tokens)),
        atol=1e-6,
    )
    critic = dict(critic, likelihood_weight=jnp.asarray(0.7, jnp.float32))
    critic["value_head"] = {"kernel": jnp.full((16, 1), 0.1), "bias": jnp.asarray([0.3])}
    actor = {k: v for k, v in critic.items() if k in ("decoder", "lm_head")}
    logits = np.asarray(models.forward(base, actor, tokens), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tok = np.asarray(tokens)
    want_lp = np.zeros(tok.shape)
    for b in range(tok.shape[0]):
        for t in range(1, tok.shape[1]):
            want_lp[b, t] = logits[b, t - 1, tok[b, t]] - logz[b, t - 1]
    hidden_part = np.asarray(
        models.values(base, dict(plain, value_head=critic["value_head"]), tokens)
    )
    got = np.asarray(models.values(config, critic, tokens))
    np.testing.assert_allclose(got, hidden_part + 0.7 * want_lp, rtol=1e-5, atol=1e-5)
    # The same log-likelihoods as the actor's own token_logprobs.
    np.testing.assert_allclose(
        want_lp, np.asarray(models.token_logprobs(base, actor, tokens)), atol=1e-5
    )
    g = jax.grad(lambda p: jnp.sum(models.values(config, p, tokens)))(critic)
    assert float(jnp.abs(g["likelihood_weight"])) > 0  # The weight learns.


def test_value_inputs_errors_and_hf_refusal(tmp_path):
    shape = dict(
        vocab_size=8, hidden_size=4, intermediate_size=4, num_layers=1, num_heads=1, num_kv_heads=1
    )
    with pytest.raises(ValueError, match="value_inputs='logits'"):
        ModelConfig(**shape, value_inputs="logits")
    config = ModelConfig(**shape, value_inputs="hidden+likelihood")
    critic = models.init_params(config, jax.random.key(0), head="value")
    with pytest.raises(NotImplementedError, match="value_inputs='hidden\\+likelihood'"):
        hf.save_checkpoint(str(tmp_path), config, critic, head="value")


@pytest.mark.parametrize(
    "dtype,param_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)],
)
def test_attention_projections_are_flax_dense_general(dtype, param_dtype):
    """The model's own projections (which, unlike Flax's DenseGeneral, trace under logical-axis
    rules) create the parameters DenseGeneral creates from the same key and give its outputs,
    bit for bit, for inputs of any rank."""
    import flax.linen as nn

    from vcppo_jax.models.transformer import HeadProjection, OutputProjection, _init

    init = _init(("embed", "heads", "head_dim"))
    ours = HeadProjection(3, 4, "heads", True, dtype, param_dtype)
    theirs = nn.DenseGeneral(
        (3, 4), dtype=dtype, param_dtype=param_dtype, kernel_init=init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
    )  # fmt: skip
    out_ours = OutputProjection(8, dtype, param_dtype)
    out_theirs = nn.DenseGeneral(
        8, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=_init(("heads", "head_dim", "embed")),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for shape in [(5, 8), (2, 5, 8), (2, 3, 5, 8)]:
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        a = nn.meta.unbox(ours.init(jax.random.key(1), x))
        b = nn.meta.unbox(theirs.init(jax.random.key(1), x))
        b["params"]["bias"] = b["params"]["bias"] + 0.5  # A bias that shows.
        a["params"]["bias"] = b["params"]["bias"]
        np.testing.assert_array_equal(a["params"]["kernel"], b["params"]["kernel"])
        y_ours, y_theirs = ours.apply(a, x), theirs.apply(b, x)
        assert y_ours.dtype == y_theirs.dtype
        np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_theirs))
        c = nn.meta.unbox(out_ours.init(jax.random.key(2), y_ours))
        d = nn.meta.unbox(out_theirs.init(jax.random.key(2), y_ours))
        np.testing.assert_array_equal(c["params"]["kernel"], d["params"]["kernel"])
        z_ours, z_theirs = out_ours.apply(c, y_ours), out_theirs.apply(d, y_ours)
        assert z_ours.dtype == z_theirs.dtype
        np.testing.assert_array_equal(np.asarray(z_ours), np.asarray(z_theirs))
