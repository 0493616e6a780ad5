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
