"""The training benchmark's FLOP count (by hand) and one tiny run of it."""

from benchmarks import train
from vcppo_jax.models import ModelConfig


def test_flops_count_by_hand():
    c = ModelConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    # Per layer: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 3 x 8x16: 64+32+32+64+384 = 576.
    assert train.matmul_params(c, "lm") == 2 * 576 + 8 * 100
    assert train.matmul_params(c, "value") == 2 * 576 + 8
    assert train.flops_per_token(c, 10, "lm") == 6 * (2 * 576 + 800) + 12 * 2 * 8 * 10


def test_a_tiny_run_reports_memory_and_speed_for_both_updates(tmp_path):
    import json

    out = tmp_path / "train.json"
    report = train.run("long", [(1, 32)], "blockwise", "xla", "float32", "none", 1, str(out))
    assert report["attention"] == "blockwise" and report["peer"] == "xla"
    keys = {f"1x32/{u}/{k}" for u in ("actor", "critic") for k in ("blockwise", "xla")}
    assert set(report["results"]) == keys
    for r in report["results"].values():
        assert r["compiled_temp_bytes"] > 0 and r["tokens_per_s"] > 0
        assert "error" not in r
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # Written as it went.


def test_decode_floor_by_hand_and_the_qwen_shape():
    import jax

    from benchmarks import sampling
    from vcppo_jax import models

    c = ModelConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4,
        num_kv_heads=2, dtype="bfloat16", param_dtype="bfloat16",
    )  # fmt: skip
    # Weights 2 x 576 + 800 (as above); K and V: 2 x 2 layers x 3 rows x 2 heads x 10 x 2 dims.
    assert sampling.decode_bytes_per_step(c, 3, 10) == 2 * (2 * 576 + 800 + 2 * 2 * 3 * 2 * 10 * 2)
    qwen = sampling.bench_config("qwen2.5-0.5b", "bfloat16")
    shapes = jax.eval_shape(lambda k: models.init_params(qwen, k), jax.random.key(0))
    assert sampling.count_params(shapes) == 494_032_768  # Qwen2.5-0.5B's published count.


def test_the_log_prob_head_memory_report_runs_and_chunking_saves_memory():
    from benchmarks import sampling

    mem = sampling.logprob_memory(batch=4, length=2048, vocab=32768, hidden=16)  # 4 chunks.
    assert mem["chunk_size"] >= 1
    for mode in ("forward", "forward+backward"):
        assert 0 < mem[f"chunked {mode}"] < mem[f"unchunked {mode}"], mem
