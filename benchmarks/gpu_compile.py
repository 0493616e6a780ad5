"""What XLA's GPU compiler makes of the training updates and the decoder, compiled for a named
GPU on a machine that has none.

    pip install "jax-cuda12-plugin[with-cuda]==0.10.2"   # the compiler and CUDA's tools only
    python -m benchmarks.gpu_compile [--target h100] [--parts train,decode] \\
        [--models qwen2.5-0.5b,qwen2.5-1.5b] [--shapes 8x2048,2x8192,1x32768] \\
        [--attention cudnn,blockwise,xla] [--decode 64x128x512]
    python -m benchmarks.gpu_compile --parts config --config configs/vcppo.py:small

JAX's CUDA plugin can compile for a GPU described by a target configuration (the device's
compute capability, core count, memory and bandwidth; ``TARGETS``) without a GPU or a driver.
The programs are the project's own, compiled as a run would compile them, but never run, so
every figure here is the compiler's plan, not a measurement of time:

- ``train``: for each model shape, ``B x T`` shape and attention implementation, the PPO actor
  update and the critic update (bf16, remat full, as ``benchmarks/train.py``): XLA's compiled
  memory analysis (temporaries, arguments, outputs) and the number of cuDNN attention calls.
  Whether training memory grows linearly with T is read off the temporaries.
- ``config``: an experiment config's (``--config path:VARIANT``) actor and critic updates of
  one minibatch and its decode loop of one rollout batch, on one device, with
  ``experiments/memory_plan.py``'s plan for the same config beside them.
- ``decode``: ``sampling.decode`` at ``batch x prompt x new`` (greedy, bf16): the kernels one
  generated token launches (the loop body's fusions, library calls and copies, by the part of
  the model they come from) and the loop condition's. A decode step that launches hundreds of
  small kernels is bound by launching them, whatever its bytes.

Writes ``benchmarks/results/compiled_<target>.json`` after each program, and resumes from it:
a program already in the file is not compiled again (decode is always recompiled).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import time

# Target configurations (XLA's GpuTargetConfig, text form), from the vendors' data sheets.
_DEVICE_INFO = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", bandwidth=3352320000000, memory=84929347584),
    "h200": dict(name="NVIDIA H200", bandwidth=4800000000000, memory=150754820096),
}

# HLO instructions that launch no kernel of their own.
_NO_KERNEL = {
    "bitcast", "get-tuple-element", "parameter", "tuple", "constant", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency",
}  # fmt: skip
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")


def target_config(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return _DEVICE_INFO.format(**TARGETS[target])


def computations(hlo: str) -> dict[str, list[str]]:
    """An HLO module's text -> {computation name: its instruction lines}; the entry
    computation is also under ``"ENTRY"``."""
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            out[current] = []
            if line.startswith("ENTRY"):
                out["ENTRY"] = out[current]
        elif line.startswith("}"):
            current = None
        elif current is not None:
            out[current].append(line)
    return out


def _part(line: str) -> str:
    """The part of the model an instruction comes from, by its op_name metadata."""
    name = re.search(r'op_name="([^"]*)"', line)
    path = name.group(1) if name else ""
    if "/attn/" in path:
        return "attention"
    if "/mlp/" in path:
        return "mlp"
    if "norm" in path:
        return "norm"
    if "/layers_" in path:
        return "residual"
    if "Transformer" in path:
        return "embedding and head"
    return "sampling and loop"


def kernels(lines: list[str]) -> collections.Counter:
    """Kernels one run of a computation launches, by model part: every instruction but those
    in ``_NO_KERNEL`` (after fusion, each fusion, library call or copy is one launch)."""
    out: collections.Counter = collections.Counter()
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m and m.group(2) not in _NO_KERNEL:
            out[_part(line)] += 1
    return out


def while_loops(hlo: str) -> list[tuple[str, str]]:
    """(condition, body) names of the entry computation's while loops."""
    entry = computations(hlo).get("ENTRY", [])
    pattern = re.compile(r"condition=%([^,\s]+), body=%([^,\s]+)")
    return [m.groups() for line in entry if (m := pattern.search(line))]


def _topology(target: str):
    """A one-device mesh of the target GPU, made by the CUDA plugin without a device."""
    import jax
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=target_config(target), topology="1x1x1"
        )
    except Exception as e:
        raise SystemExit(
            "compiling for a GPU without one needs JAX's CUDA plugin and CUDA's tools "
            '(pip install "jax-cuda12-plugin[with-cuda]==0.10.2"); '
            f"making the {target} topology failed: {type(e).__name__}: {str(e)[:300]}"
        ) from e
    mesh = topologies.make_mesh(topo, (1,), ("device",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _on(sharding, tree):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def shape_config(model: str, attention: str):
    """A ``benchmarks/train.py`` model shape in bf16 with remat full."""
    from benchmarks.train import SHAPES
    from vcppo_jax.models import ModelConfig

    return ModelConfig(
        **SHAPES[model], dtype="bfloat16", param_dtype="bfloat16", remat="full", attention=attention
    )


def train_memory(sharding, config, b: int, t: int, head: str) -> dict:
    """One actor (``head="lm"``) or critic update of ``config``'s model compiled for the
    target: memory analysis."""
    import jax
    import jax.numpy as jnp

    from vcppo_jax import models, train_state, updates

    def make_state():
        params = models.init_params(config, jax.random.key(0), head=head)
        return train_state.TrainState.create(params, train_state.make_optimizer(1e-5))

    state = _on(sharding, jax.eval_shape(make_state))
    n = t - 1
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    batch = (arg((b, t), jnp.int32), arg((b, n), jnp.int32), arg((b, n), jnp.float32))
    f32 = arg((b, n), jnp.float32)
    if head == "lm":
        settings = updates.ActorSettings()
        fn = lambda s, *a: updates.actor_step(config, s, *a, settings)
        args = (*batch, f32, f32, f32, arg((b,), jnp.bool_))
    else:
        fn = lambda s, *a: updates.critic_step(config, s, *a)
        args = (*batch, f32, f32)
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn, donate_argnums=0).lower(state, *args).compile()
    except Exception as e:  # Recorded; the other programs still compile.
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    mem = compiled.memory_analysis()
    return {
        "compiled_temp_bytes": int(mem.temp_size_in_bytes),
        "compiled_argument_bytes": int(mem.argument_size_in_bytes),
        "compiled_output_bytes": int(mem.output_size_in_bytes),
        "cudnn_attention_calls": compiled.as_text().count('custom_call_target="__cudnn$fmha'),
        "compile_seconds": round(time.perf_counter() - t0, 1),
    }


def decode_kernels(sharding, config, batch: int, prompt: int, new: int) -> dict:
    """``sampling.decode`` of ``config``'s model compiled for the target: kernels per
    generated token, and memory."""
    import jax
    import jax.numpy as jnp

    from benchmarks.sampling import decode_bytes_per_step
    from vcppo_jax import models, sampling

    params = _on(
        sharding, jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
    )
    sp = sampling.SamplingParams(max_new_tokens=new, temperature=0.0)
    state = jax.eval_shape(
        lambda p, x, n: sampling.prefill(config, p, x, n, sp, jax.random.key(0)),
        params,
        jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    compiled = sampling.decode.lower(config, params, _on(sharding, state), sp).compile()
    hlo = compiled.as_text()
    comps = computations(hlo)
    loops = while_loops(hlo)
    if len(loops) != 1:
        raise RuntimeError(f"expected one decode loop in the compiled program; found {len(loops)}")
    condition, body = loops[0]
    per_token = kernels(comps[body])
    mem = compiled.memory_analysis()
    return {
        "kernels_per_token": sum(per_token.values()),
        "kernels_per_token_by_part": dict(per_token.most_common()),
        "kernels_per_layer": round(
            sum(per_token[p] for p in ("attention", "mlp", "norm", "residual")) / config.num_layers,
            2,
        ),
        "condition_kernels": sum(kernels(comps[condition]).values()),
        "floor_bytes_per_token_step": decode_bytes_per_step(config, batch, prompt + new / 2),
        "compiled_temp_bytes": int(mem.temp_size_in_bytes),
        "compiled_argument_bytes": int(mem.argument_size_in_bytes),
    }


def config_programs(sharding, spec: str, prompt_budget: int | None = None) -> dict:
    """An experiment config's (``path:VARIANT``) largest programs on one device of the target,
    beside ``experiments/memory_plan.py``'s plan for it: the actor and critic updates of one
    minibatch and the decode loop of one rollout batch, prompts of ``prompt_budget`` tokens
    (the plan's default) and ``rollout.max_new_tokens`` new ones."""
    from experiments import memory_plan
    from vcppo_jax.models import attention as attention_lib

    config = memory_plan.load_config(spec)
    model = memory_plan.model_shape(config)
    model = model.replace(attention=attention_lib.resolve(model.attention, "gpu", model.dtype))
    plan = memory_plan.plan(config, 1, "gpu", prompt_budget)
    budget = prompt_budget or (1024 if config.model.hf_path else 256)
    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    minibatch = max(1, rows // config.ppo.minibatches)
    new = config.rollout.max_new_tokens
    return {
        "attention": model.attention,
        "minibatch": [minibatch, budget + new],
        "rollout": [rows, budget, new],
        "plan_bytes": {k: int(v) for k, v in plan.items() if not k.startswith("_")},
        "actor": train_memory(sharding, model, minibatch, budget + new, "lm"),
        "critic": train_memory(sharding, model, minibatch, budget + new, "value"),
        "decode": decode_kernels(sharding, model, rows, budget, new),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="h100", choices=list(TARGETS))
    parser.add_argument("--parts", default="train,decode")
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--shapes", default="8x2048,2x8192,1x32768")
    parser.add_argument("--attention", default="cudnn,blockwise,xla")
    parser.add_argument("--decode", default="64x128x512", help="batch x prompt x new tokens")
    parser.add_argument(
        "--config", default=None, help="the config part's experiment config (path:VARIANT)"
    )
    parser.add_argument("--prompt_budget", type=int, default=None, help="the config part's")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - {"train", "decode", "config"}:
        parser.error(f"unknown parts {sorted(unknown)}; known: train, decode, config")
    if ("config" in parts) != bool(args.config):
        parser.error("--config goes with the config part, and the config part needs it")
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
        decode_shape = tuple(int(x) for x in args.decode.split("x"))
        assert all(len(s) == 2 for s in shapes) and len(decode_shape) == 3
    except (ValueError, AssertionError):
        parser.error("--shapes takes BxT[,BxT...] and --decode BATCHxPROMPTxNEW, in integers")

    # The programs are built for the target, not for this host's devices: the host stays the
    # default backend, and the plugin's check for a usable local GPU is skipped.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax

    from benchmarks.report import write_report
    from benchmarks.sampling import bench_config

    jax.config.update("jax_platforms", "cpu")
    sharding = _topology(args.target)
    out = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"compiled_{args.target}.json"
    )
    report = {"target": TARGETS[args.target]["name"], "jax": jax.__version__, "train": {}}
    if os.path.exists(out):  # Resumed: what an earlier run compiled is kept, not redone.
        with open(out) as f:
            earlier = json.load(f)
        if earlier.get("target") != report["target"]:
            raise SystemExit(
                f"{out} holds results for {earlier.get('target')}, not {report['target']}"
            )
        report.update(earlier)
    for model in args.models.split(",") if "train" in parts else []:
        for b, t in shapes:
            for head, update in (("lm", "actor"), ("value", "critic")):
                for kind in args.attention.split(","):
                    key = f"{model}/{b}x{t}/{update}/{kind}"
                    if key in report["train"]:
                        continue
                    r = train_memory(sharding, shape_config(model, kind), b, t, head)
                    report["train"][key] = r
                    gib = {k: round(v / 2**30, 3) for k, v in r.items() if k.endswith("bytes")}
                    print(f"[compile] {key}: {gib or r}", flush=True)
                    write_report(report, "compiled", out)
    # A decode step attends through XLA's products unless cuDNN is asked for (blockwise only
    # changes the prompt pass).
    decode_kinds = ["xla"] + (["cudnn"] if "cudnn" in args.attention.split(",") else [])
    for model in args.models.split(",") if "decode" in parts else []:
        for kind in decode_kinds:
            key = f"{model}/{args.decode}/{kind}"
            r = decode_kernels(sharding, bench_config(model, "bfloat16", kind), *decode_shape)
            report.setdefault("decode", {})[key] = r
            print(f"[compile] decode {key}: {r}", flush=True)
    if "config" in parts:
        r = config_programs(sharding, args.config, args.prompt_budget)
        report.setdefault("config", {})[args.config] = r
        for name in ("actor", "critic", "decode"):
            gib = {k: round(v / 2**30, 3) for k, v in r[name].items() if k.endswith("bytes")}
            print(f"[compile] {args.config} {name}: {gib}", flush=True)
    write_report(report, "compiled", out)


if __name__ == "__main__":
    main()
