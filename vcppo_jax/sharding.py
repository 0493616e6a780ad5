"""Device mesh and logical-axis sharding.

Model code names the axes of every parameter and activation (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``; ``batch``, ``length``, ``activation_embed``); a rule table
maps each name to mesh axes (or to nothing: replicated). Parameters are placed by the rules,
and the model's activation constraints follow them where a step is traced under
``nn.logical_axis_rules`` (the runner's are); a name a table leaves out is replicated. The
mesh comes from sizes such as ``{"data": -1, "fsdp": 1, "tensor": 1}`` where ``-1`` takes the
remaining devices.

A pod, e.g. 256 chips for Qwen2.5-32B: ``{"data": -1, "fsdp": 16, "tensor": 4}`` gives
4 x 16 x 4; batch over data*fsdp, parameters over fsdp (ZeRO-3 style) and tensor.

Parameters are created already sharded: shapes come from ``jax.eval_shape`` and the init
function is jitted with ``out_shardings``, so no device ever holds a full copy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("activation_embed", None),  # The residual stream's width (``embed`` names the weights').
)


class ShardingError(ValueError):
    """A mesh that does not fit the devices, or a parameter that a mesh axis does not divide."""

    pass


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves ``-1`` and checks that the sizes multiply to the device count."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ShardingError(f"at most one mesh axis may be -1; got {sizes}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ShardingError(f"mesh axis sizes must be >= 1 or -1; got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ShardingError(
                f"mesh {sizes}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} devices available"
            )
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices; {num_devices} are available"
        )
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``data``, ``fsdp``, ``tensor`` (Auto axis types)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types, devices=devices
    )


def logical_to_spec(names: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec mapping each logical axis name through ``rules`` (an unlisted or None
    name is replicated); ``names=None`` gives a fully replicated spec."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def param_shardings(logical_specs, mesh: Mesh, rules=DEFAULT_RULES, shapes=None):
    """Tree of logical PartitionSpecs (``models.abstract_params(...)[1]``) -> NamedShardings.

    With ``shapes`` (a tree of arrays or ShapeDtypeStructs), a dimension that a mesh axis does
    not divide raises an error naming the parameter.
    """

    def one(path, spec):
        pspec = logical_to_spec(tuple(spec) if spec is not None else None, rules)
        return NamedSharding(mesh, pspec)

    shardings = jax.tree_util.tree_map_with_path(
        one, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )
    if shapes is not None:
        check_divisible(shapes, shardings)
    return shardings


def check_divisible(shapes, shardings) -> None:
    """Raises ``ShardingError`` naming the first parameter with a dimension not divisible by the
    size of the mesh axes it is sharded over."""

    def check(path, leaf, sharding):
        mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape, strict=True))
        for dim, axes in zip(leaf.shape, sharding.spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            n = math.prod(mesh_sizes[a] for a in axes)
            if dim % n:
                name = jax.tree_util.keystr(path)
                raise ShardingError(
                    f"parameter {name} of shape {leaf.shape}: dimension {dim} is not divisible "
                    f"by mesh axes {axes} (size {n}); change the mesh or the rules"
                )

    jax.tree_util.tree_map_with_path(check, shapes, shardings)


def rule_axes(name: str, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rules give the logical axis ``name`` (empty: replicated), read as Flax
    reads a table for the model's activation constraints: the first rule for a name."""
    axes = next((axes for logical, axes in rules if logical == name), None) or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def dividing_axes(dim: int, axes: Sequence[str], sizes: Mapping[str, int]) -> tuple[str, ...]:
    """Of the mesh ``axes`` (with their ``sizes``), in order, those that split ``dim`` evenly
    one after another; an axis of size 1 splits nothing and is left out."""
    out, n = [], 1
    for axis in axes:
        size = sizes.get(axis, 1)
        if size > 1 and dim % (n * size) == 0:
            out.append(axis)
            n *= size
    return tuple(out)


@contextlib.contextmanager
def tracing(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """The context a run traces its steps in: the mesh (``jax.set_mesh``) and its logical-axis
    rules (``nn.logical_axis_rules``), which the model's activation constraints follow (``()``:
    none apply). Always entered together: jit keys its traces on the mesh in force, not on
    Flax's rules, so a trace under this mesh is then one under these rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def batch_axes(rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the ``batch`` rule splits a batch over (empty: replicated)."""
    return rule_axes("batch", rules)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[B, ...]`` batch: the batch over the ``batch`` rule's mesh axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def init_sharded(config, rng: jax.Array, mesh: Mesh, rules=DEFAULT_RULES, head: str = "lm"):
    """Random parameters created directly in their shards -> (params, shardings)."""
    from vcppo_jax import models

    shapes, specs = models.abstract_params(config, head)
    shardings = param_shardings(specs, mesh, rules, shapes)
    init = jax.jit(lambda key: models.init_params(config, key, head), out_shardings=shardings)
    with mesh, nn.logical_axis_rules(rules):
        return init(rng), shardings


def shard_params(params, config, mesh: Mesh, rules=DEFAULT_RULES, head: str = "lm"):
    """Places host parameters (e.g. from ``hf.load_checkpoint``) onto the mesh."""
    from vcppo_jax import models

    shapes, specs = models.abstract_params(config, head)
    shardings = param_shardings(specs, mesh, rules, shapes)
    return jax.device_put(params, shardings), shardings
