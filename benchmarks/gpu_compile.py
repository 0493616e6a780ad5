"""What XLA's GPU compiler makes of the training updates and the decoder, compiled for a named
GPU on a machine that has none.

    pip install "jax-cuda12-plugin[with-cuda]==0.10.2"   # the compiler and CUDA's tools only
    python -m benchmarks.gpu_compile [--target h100] [--parts train,decode] \\
        [--models qwen2.5-0.5b,qwen2.5-1.5b] [--shapes 8x2048,2x8192,1x32768] \\
        [--attention cudnn,blockwise,xla] [--remat full] [--decode 64x128x512]
    python -m benchmarks.gpu_compile --parts config --config configs/vcppo.py:small [--devices 8]
    python -m benchmarks.gpu_compile --parts config --config configs/vcppo.py:qwen2.5-32b \
        --devices 256 [--layers 8]

JAX's CUDA plugin can compile for a GPU described by a target configuration (the device's
compute capability, core count, memory and bandwidth; ``TARGETS``) without a GPU or a driver.
The programs are the project's own, compiled as a run would compile them, but never run, so
every figure here is the compiler's plan, not a measurement of time:

- ``train``: for each model shape, ``B x T`` shape and attention implementation, the PPO actor
  update and the critic update (bf16, remat full by default, as ``benchmarks/train.py``; other
  ``--remat`` policies under keys ending ``/remat=POLICY``): XLA's compiled memory analysis
  (temporaries, arguments, outputs) and the number of cuDNN attention calls. Whether training
  memory grows linearly with T is read off the temporaries; whether a shape fits a card without
  remat's recomputation (a third more FLOPs, which MFU does not count), off the others.
- ``config``: an experiment config's (``--config path:VARIANT``) actor and critic updates of
  one minibatch and its decode loop of one rollout batch, on ``--devices`` GPUs under the
  config's own mesh and logical-axis rules (memory per device, and the collectives each
  device takes part in, by kind: how many and their bytes), with
  ``experiments/memory_plan.py``'s plan for the same config beside them. Traced as the runner
  traces (under the mesh and the rules, which the model's activation constraints follow).
- ``decode``: ``sampling.decode`` at ``batch x prompt x new`` (greedy, bf16): the kernels one
  generated token launches (the loop body's fusions, library calls and copies, by the part of
  the model they come from) and the loop condition's. A decode step that launches hundreds of
  small kernels is bound by launching them, whatever its bytes.

``XLA_FLAGS`` apply as in a run (the config part records them with its results).

Writes ``benchmarks/results/compiled_<target>.json`` after each program, and resumes from it:
a training program already in the file is not compiled again (the decode and config parts
always are).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
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
    in ``_NO_KERNEL`` (after fusion, each fusion, library call or copy is one launch); an
    asynchronous pair (``all-gather-start`` / ``-done``) counts once, at its start. A
    ``call`` (a command buffer, say) counts as one launch, not its contents."""
    out: collections.Counter = collections.Counter()
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m and m.group(2) not in _NO_KERNEL and not m.group(2).endswith("-done"):
            out[_part(line)] += 1
    return out


_COLLECTIVE = re.compile(r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([0-9,]*)\]")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LOOP = re.compile(r"condition=%([^,\s]+), body=%([^,\s]+)")
_CALLED = re.compile(r"(?:to_apply|calls)=%([^,\s]+)")
_BRANCHES = re.compile(r"(?:branch_computations=\{([^}]*)\}|true_computation=%([^,\s]+), "
                       r"false_computation=%([^,\s]+))")  # fmt: skip
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([^}]*)\}")


def _bytes(types: str) -> int:
    """The bytes of every array in an HLO type (an array, or a tuple of them, nested)."""
    total = 0
    for dtype, dims in _ARRAY.findall(types):
        bits = 8 if dtype == "pred" else int(re.match(r"[a-z]+(\d+)", dtype).group(1))
        total += -(-bits * math.prod(int(d) for d in dims.split(",") if d) // 8)
    return total


def _elements(types: str) -> list[str]:
    """The top-level elements of a tuple type ``(a, (b, c), d)``; an array type alone."""
    types = types.strip()
    if not types.startswith("("):
        return [types]
    parts, depth, current = [], 0, []
    for ch in types[1:-1]:
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    return parts + ["".join(current)]


def _collective_bytes(op: str, kind: str, result: str, line: str) -> int:
    """A collective's bytes per device at the larger of its input and output side: an
    asynchronous gather, scatter or permute returns (inputs, outputs, ...); an all-reduce its
    outputs (as its inputs); a synchronous reduce-scatter its outputs, one group member's
    share of the inputs."""
    if op.endswith("-start") and kind != "all-reduce":
        parts = _elements(result)
        return max(_bytes(parts[0]), _bytes(parts[1])) if len(parts) > 1 else _bytes(result)
    if kind == "reduce-scatter":
        iota, listed = _IOTA_GROUPS.search(line), _LISTED_GROUPS.search(line)
        group = int(iota.group(1)) if iota else len(listed.group(1).split(",")) if listed else 1
        return _bytes(result) * group
    return _bytes(result)


def collectives(comps: dict[str, list[str]], name: str = "ENTRY") -> dict[str, list[int]]:
    """The collectives one run of computation ``name`` performs, with those of the
    computations it runs: a while loop's body times its known trip count (once where the count
    is unknown), a called computation once, a conditional's costliest branch. {kind: [count,
    bytes]}, bytes per device, each collective at the larger of its input and output side
    (combined collectives at all their arrays; an asynchronous pair once)."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])

    def add(found: dict[str, list[int]], times: int = 1) -> None:
        for k, (n, b) in found.items():
            out[k][0] += n * times
            out[k][1] += b * times

    for line in comps.get(name, []):
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op = m.group(2)
        kind = _COLLECTIVE.fullmatch(op.removesuffix("-start"))
        if kind:
            result = line.split("=", 1)[1].split(f" {op}(", 1)[0]
            add({kind.group(1): [1, _collective_bytes(op, kind.group(1), result, line)]})
        elif op == "while" and (loop := _LOOP.search(line)):
            trips = _TRIPS.search(line)
            add(collectives(comps, loop.group(2)), int(trips.group(1)) if trips else 1)
        elif op in ("call", "async-start") and (called := _CALLED.search(line)):
            add(collectives(comps, called.group(1)))
        elif op == "conditional" and (branches := _BRANCHES.search(line)):
            names = [n.strip().lstrip("%") for n in (branches.group(1) or "").split(",")]
            names = [n for n in names + [branches.group(2), branches.group(3)] if n]
            found = [collectives(comps, n) for n in names]
            add(max(found, key=lambda f: sum(b for _, b in f.values()), default={}))
    return dict(out)


def while_loops(hlo: str) -> list[tuple[str, str]]:
    """(condition, body) names of the entry computation's while loops."""
    entry = computations(hlo).get("ENTRY", [])
    return [m.groups() for line in entry if (m := _LOOP.search(line))]


def target_mesh(target: str, sizes: dict | None = None):
    """A mesh (axes ``data``, ``fsdp``, ``tensor``) of target GPUs made by the CUDA plugin
    without a device: one device, or ``sizes`` (every axis given, as ``sharding.mesh_shape``
    resolves a config's ``mesh``), in hosts of up to 8 GPUs."""
    import jax
    import numpy as np
    from jax.experimental import topologies

    from vcppo_jax import sharding

    sizes = dict(sizes or {"data": 1, "fsdp": 1, "tensor": 1})
    n = math.prod(v for v in sizes.values() if v > 0)
    if -1 in sizes.values():
        raise ValueError(f"mesh {sizes}: give every size for a compile (no -1)")
    per_host = math.gcd(n, 8)
    try:
        topo = topologies.get_topology_desc(
            platform="cuda",
            target_config=target_config(target),
            topology=f"1x{n // per_host}x{per_host}",
        )
    except Exception as e:
        raise SystemExit(
            "compiling for a GPU without one needs JAX's CUDA plugin and CUDA's tools "
            '(pip install "jax-cuda12-plugin[with-cuda]==0.10.2"); '
            f"making the {target} topology failed: {type(e).__name__}: {str(e)[:300]}"
        ) from e
    shape = tuple(sizes[a] for a in sharding.MESH_AXES)
    devices = np.asarray(topo.devices).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.sharding.Mesh(devices, sharding.MESH_AXES, axis_types=axis_types)


def _placed(tree, shardings):
    """Shapes of ``tree`` placed by the matching tree of ``shardings``, or by one sharding."""
    import jax

    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _rows(mesh, rules, shape, dtype):
    """A ``[B, ...]`` input's shape, split by rows as a run splits its batch."""
    import jax

    from vcppo_jax import sharding

    return jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding.batch_sharding(mesh, rules, len(shape))
    )


def _abstract_state(config, head: str, mesh, rules):
    """The train state of ``config``'s actor (``head="lm"``) or critic as shapes placed as a
    run places them: parameters by the logical-axis ``rules``, Adam's moments as their
    parameters, counters replicated."""
    import jax

    from vcppo_jax import models, sharding, train_state

    shapes, specs = models.abstract_params(config, head)
    placed = sharding.param_shardings(specs, mesh, rules, shapes)
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.eval_shape(
        lambda p: train_state.TrainState.create(p, train_state.make_optimizer(1e-5)), shapes
    )
    adam = state.opt_state[1][0]  # After clipping: optax's Adam state (count, mu, nu).
    rest = _placed(state, whole)
    adam = rest.opt_state[1][0]._replace(mu=_placed(adam.mu, placed), nu=_placed(adam.nu, placed))
    opt = (rest.opt_state[0], (adam, *rest.opt_state[1][1:]), *rest.opt_state[2:])
    return rest.replace(params=_placed(state.params, placed), opt_state=opt)


def shape_config(model: str, attention: str, remat: str = "full"):
    """A ``benchmarks/train.py`` model shape in bf16 (remat full unless asked otherwise)."""
    from benchmarks.train import SHAPES
    from vcppo_jax.models import ModelConfig

    return ModelConfig(
        **SHAPES[model], dtype="bfloat16", param_dtype="bfloat16", remat=remat, attention=attention
    )


def train_memory(
    mesh, config, b: int, t: int, head: str, rules=None, traced_under_rules: bool = True
) -> dict:
    """One actor (``head="lm"``) or critic update of ``config``'s model on ``[b, t]`` (the
    global batch) compiled for the mesh's target GPUs: memory analysis per device."""
    import jax
    import jax.numpy as jnp

    from vcppo_jax import sharding, updates

    rules = rules or sharding.DEFAULT_RULES
    state = _abstract_state(config, head, mesh, rules)
    n = t - 1
    arg = lambda shape, dtype: _rows(mesh, rules, shape, dtype)
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
        with sharding.tracing(mesh, rules if traced_under_rules else ()):
            compiled = jax.jit(fn, donate_argnums=0).lower(state, *args).compile()
    except Exception as e:  # Recorded; the other programs still compile.
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    return {
        "compiled_temp_bytes": int(mem.temp_size_in_bytes),
        "compiled_argument_bytes": int(mem.argument_size_in_bytes),
        "compiled_output_bytes": int(mem.output_size_in_bytes),
        "cudnn_attention_calls": hlo.count('custom_call_target="__cudnn$fmha'),
        "collectives": collectives(computations(hlo)),
        "compile_seconds": round(time.perf_counter() - t0, 1),
    }


def decode_kernels(
    mesh, config, batch: int, prompt: int, new: int, rules=None, traced_under_rules: bool = True
) -> dict:
    """``sampling.decode`` of ``config``'s model (``batch`` rows in all) compiled for the
    mesh's target GPUs, its state placed as the compiled prompt pass leaves it: kernels per
    generated token, and memory per device."""
    import jax
    import jax.numpy as jnp

    from benchmarks.sampling import decode_bytes_per_step
    from vcppo_jax import models, sampling, sharding

    rules = rules or sharding.DEFAULT_RULES
    shapes, specs = models.abstract_params(config, "lm")
    placed = sharding.param_shardings(specs, mesh, rules, shapes)
    params = _placed(shapes, placed)
    key = jax.eval_shape(lambda: jax.random.key(0))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sp = sampling.SamplingParams(max_new_tokens=new, temperature=0.0)
    with sharding.tracing(mesh, rules if traced_under_rules else ()):
        first = sampling.prefill.lower(
            config,
            params,
            _rows(mesh, rules, (batch, prompt), jnp.int32),
            _rows(mesh, rules, (batch,), jnp.int32),
            sp,
            _placed(key, whole),
        ).compile()
        state = _placed(first.out_info, first.output_shardings)
        compiled = sampling.decode.lower(config, params, state, sp).compile()
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
        "collectives_per_token": collectives(comps, body),
        # Over all devices: the weights once and the whole batch's cache at the mean length.
        "floor_bytes_per_token_step_all_devices": decode_bytes_per_step(
            config, batch, prompt + new / 2
        ),
        "compiled_temp_bytes": int(mem.temp_size_in_bytes),
        "compiled_argument_bytes": int(mem.argument_size_in_bytes),
    }


def config_programs(
    target: str,
    spec: str,
    devices: int = 1,
    prompt_budget=None,
    layers: int | None = None,
    traced_under_rules: bool = True,
) -> dict:
    """An experiment config's (``path:VARIANT``) largest programs on ``devices`` target GPUs,
    under the config's mesh and rules, beside ``experiments/memory_plan.py``'s plan for it:
    the actor and critic updates of one minibatch and the decode loop of one rollout batch,
    prompts of ``prompt_budget`` tokens (the plan's default) and ``rollout.max_new_tokens``
    new ones. Memory is per device. ``layers``: the model cut to that many layers (a quick
    compile that shows how memory grows per layer; no plan beside it)."""
    from experiments import memory_plan
    from vcppo_jax import sharding
    from vcppo_jax.models import attention as attention_lib

    config = memory_plan.load_config(spec)
    model = memory_plan.model_shape(config)  # A checkpoint's shape, or the config's own.
    kind = attention_lib.resolve(config.model.attention, "gpu", model.dtype, model.head_size)
    model = model.replace(attention=kind, remat=config.model.remat)
    if layers:
        model = model.replace(num_layers=layers)
    sizes = sharding.mesh_shape({a: config.mesh[a] for a in sharding.MESH_AXES}, devices)
    mesh = target_mesh(target, sizes)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    plan = None if layers else memory_plan.plan(config, devices, "gpu", prompt_budget)
    budget = prompt_budget or memory_plan.default_prompt_budget(config)
    rows = config.rollout.prompts_per_step * config.rollout.samples_per_prompt
    minibatch = max(1, rows // config.ppo.minibatches)
    new, t = config.rollout.max_new_tokens, budget + config.rollout.max_new_tokens
    return {
        "attention": model.attention,
        "mesh": sizes,
        "minibatch": [minibatch, t],
        "rollout": [rows, budget, new],
        "layers": model.num_layers,
        "plan_bytes": None
        if layers
        else {k: int(v) for k, v in plan.items() if not k.startswith("_")},
        "actor": train_memory(mesh, model, minibatch, t, "lm", rules, traced_under_rules),
        "critic": train_memory(mesh, model, minibatch, t, "value", rules, traced_under_rules),
        "decode": decode_kernels(mesh, model, rows, budget, new, rules, traced_under_rules),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="h100", choices=list(TARGETS))
    parser.add_argument("--parts", default="train,decode")
    parser.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--shapes", default="8x2048,2x8192,1x32768")
    parser.add_argument("--attention", default="cudnn,blockwise,xla")
    parser.add_argument(
        "--remat", default="full", choices=("none", "full", "dots"), help="the train part's"
    )
    parser.add_argument("--decode", default="64x128x512", help="batch x prompt x new tokens")
    parser.add_argument(
        "--config", default=None, help="the config part's experiment config (path:VARIANT)"
    )
    parser.add_argument("--devices", type=int, default=1, help="the config part's GPUs")
    parser.add_argument("--prompt_budget", type=int, default=None, help="the config part's")
    parser.add_argument(
        "--layers", type=int, default=None, help="the config part's model cut to N layers"
    )
    parser.add_argument(
        "--without_rules",
        action="store_true",
        help="the config part traced under the mesh alone, not the rules (as runs were before "
        "the runner traced under them): what the model's activation constraints change",
    )
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
    mesh = target_mesh(args.target)
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
        report.update({k: v for k, v in earlier.items() if k != "jax"})
    for model in args.models.split(",") if "train" in parts else []:
        for b, t in shapes:
            for head, update in (("lm", "actor"), ("value", "critic")):
                for kind in args.attention.split(","):
                    key = f"{model}/{b}x{t}/{update}/{kind}"
                    key += "" if args.remat == "full" else f"/remat={args.remat}"
                    if key in report["train"]:
                        continue
                    r = train_memory(mesh, shape_config(model, kind, args.remat), b, t, head)
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
            r = decode_kernels(mesh, bench_config(model, "bfloat16", kind), *decode_shape)
            report.setdefault("decode", {})[key] = r
            print(f"[compile] decode {key}: {r}", flush=True)
    if "config" in parts:
        r = config_programs(
            args.target, args.config, args.devices, args.prompt_budget, args.layers,
            traced_under_rules=not args.without_rules,
        )  # fmt: skip
        xla_flags = os.environ.get("XLA_FLAGS", "").strip()
        r["xla_flags"] = xla_flags
        key = f"{args.config} on {args.devices}" + (
            f", {args.layers} layers" if args.layers else ""
        )
        key += f" with {xla_flags}" if xla_flags else ""
        key += ", traced without the rules" if args.without_rules else ""
        report.setdefault("config", {})[key] = r
        for name in ("actor", "critic", "decode"):
            gib = {k: round(v / 2**30, 3) for k, v in r[name].items() if k.endswith("bytes")}
            print(f"[compile] {args.config} {name}: {gib}", flush=True)
    write_report(report, "compiled", out)


if __name__ == "__main__":
    main()
