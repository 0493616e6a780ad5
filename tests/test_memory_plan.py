"""The pod memory plan counts what the shapes say."""

from configs import vcppo
from experiments import memory_plan


def test_qwen32b_plan_on_a_pod():
    result = memory_plan.plan(vcppo.get_config("qwen2.5-32b"), devices=256)
    assert result["_mesh"] == {"data": 4, "fsdp": 16, "tensor": 4}
    # 32.8B bfloat16 parameters over fsdp x tensor = 64 shards: about 1 GiB each.
    params = result["policy parameters"] * 64
    assert 64e9 < params < 67e9
    assert result["policy optimiser state"] == 2 * result["policy parameters"]
    total = sum(v for k, v in result.items() if not k.startswith("_"))
    assert total < 80 * 2**30  # Fits an 80 GiB accelerator.
    # The LM head's tensor shard (5120 x 152064 / 4, bf16), gathered, and its gradient.
    assert result["LM head gathered for the log-probs, and its gradient"] == 2 * 5120 * 38016 * 2


def test_attention_working_memory_by_kernel():
    c = vcppo.get_config("qwen2.5-32b")
    gpu = memory_plan.plan(c, devices=256, backend="gpu")
    cpu = memory_plan.plan(c, devices=256, backend="cpu")
    tpu = memory_plan.plan(c, devices=256, backend="tpu")
    key = lambda r, kind: next(k for k in r if k.startswith(f"attention working memory ({kind}"))
    assert key(gpu, "cudnn") and key(cpu, "blockwise") and key(tpu, "splash")
    # Flash kernels keep the float32 log-sum-exp per head and token.
    assert tpu[key(tpu, "splash")] == gpu[key(gpu, "cudnn")]
    assert memory_plan.attention_bytes("splash", 2, 10, 9216, 128) == 2 * 10 * 9216 * 4
    c.unlock()
    c.model.attention = "xla"
    xla = memory_plan.plan(c, devices=256)
    # 2 sequences x 10 heads x 9,216^2 x 6 bytes: ~10 GB, against ~0.6 GB by blocks.
    assert memory_plan.attention_bytes("xla", 2, 10, 9216, 128) == 2 * 10 * 9216**2 * 6
    assert xla[key(xla, "xla")] > 15 * cpu[key(cpu, "blockwise")]


def test_small_variant_validates_and_fits_one_80gb_gpu():
    from vcppo_jax import config_validation

    c = vcppo.get_config("small")
    config_validation.validate_config(c)
    result = memory_plan.plan(c, devices=1)
    assert result["_mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    # The config's own shape is counted, not the pod's: 8 layers of width 512, float32.
    shape = memory_plan.model_shape(c)
    assert (shape.num_layers, shape.hidden_size) == (8, 512)
    assert result["policy parameters"] < 2**30
    assert not any(k.startswith("LM head gathered") for k in result)  # No FSDP, no gather.
    total = sum(v for k, v in result.items() if not k.startswith("_"))
    assert total < 80 * 2**30
    # With the materialised scores kept for all 8 layers (no remat) it would not be small.
    c.unlock()
    c.model.attention = "xla"
    xla = memory_plan.plan(c, devices=1)
    attn = next(v for k, v in xla.items() if k.startswith("attention working memory (xla, every"))
    assert attn == 8 * memory_plan.attention_bytes("xla", 64, 8, 256 + 128, 64)
