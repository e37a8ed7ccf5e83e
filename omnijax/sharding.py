"""Device mesh, regex partition rules, parameter placement and activation constraints.

Mesh axes (always all four, in this order; size 1 where unused):
  data     pure data parallelism (replicated parameters, split batch);
  fsdp     data parallelism whose parameters (and optimizer state) are sharded, gathered per layer by XLA;
  context  sequence parallelism: the token axis of long sequences (omnijax.parallel.context);
  tensor   tensor (head / hidden) parallelism.

Parameters are placed by an ordered list of (regex, PartitionSpec) rules over the dotted NNX state path
("blocks.3.self_attn.q.kernel"); `re.search` semantics; the first match wins; a parameter that matches
nothing, or whose spec does not divide its shape, is an error naming both. Model files hold no mesh axis
names: the rule sets below (or a list in the config) are the only place where parameters meet mesh axes.

LoRA adapters follow their host linear: an adapter leaf named like `lora_a` ([..., I, r]) takes the host
kernel's spec on I, one named like `lora_b` ([..., r, O]) takes it on O; the rank axis is replicated. The host
is the nearest `kernel` found by walking up the adapter's path (`q.lora.lora_a` -> `q.kernel`); an adapter
with no host found goes through the rules like any other parameter.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import flax
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from omnijax.params import path_str

MESH_AXES = ("data", "fsdp", "context", "tensor")

Rule = tuple[str, P]

# Named rule sets for the Wan DiT (omnijax.models.wan.WanDiT and the branch model built on it) and Flux.
# Kernels are [I, O] (patch embedding [pt, ph, pw, C, D]); vectors (biases, norm scales) and the f32
# modulation tables are small and replicated.
RULE_SETS: dict[str, tuple[Rule, ...]] = {
    "replicated": ((".*", P()),),
    # ZeRO-3 style: every matrix sharded on its input dim over fsdp. Wan dims (1536, 5120, 8960, 13824,
    # 4096, 1280, 256) divide by fsdp sizes up to 8; the patch embedding's input dim (C=16/36) does not,
    # so it is sharded on D instead.
    "fsdp": (
        (r"(^|\.)(bias|scale)$", P()),
        (r"(^|\.)modulation$", P()),
        (r"(^|\.)patch_embedding\.kernel$", P(None, None, None, None, "fsdp")),
        (r"(^|\.)kernel$", P("fsdp", None)),
        (".*", P()),
    ),
    # fsdp plus Megatron tensor parallelism inside the blocks: q/k/v and the first FFN matrix split their
    # output (heads / hidden) over tensor, o and the second FFN matrix their input, so each block needs one
    # reduction per sub-layer. Wan's q/k RMSNorm spans all heads, which XLA handles with a small all-reduce.
    "fsdp_tp": (
        (r"(^|\.)(bias|scale)$", P()),
        (r"(^|\.)modulation$", P()),
        (r"(^|\.)patch_embedding\.kernel$", P(None, None, None, None, "fsdp")),
        (r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|k_img|v_img)\.kernel$", P("fsdp", "tensor")),
        (r"blocks\.\d+\.(self_attn|cross_attn)\.o\.kernel$", P("tensor", "fsdp")),
        (r"blocks\.\d+\.ffn\.linear_1\.kernel$", P("fsdp", "tensor")),
        (r"blocks\.\d+\.ffn\.linear_2\.kernel$", P("tensor", "fsdp")),
        (r"(^|\.)kernel$", P("fsdp", None)),
        (".*", P()),
    ),
    # Flux (omnijax.models.flux.FluxDiT, BFL tree): fsdp on every kernel's input dim plus tensor parallelism of
    # the attention / MLP matrices (qkv, MLP-in and linear1 split their output, proj / MLP-out / linear2 their
    # input). With tensor = 1 it is plain fsdp. The fused qkv columns are (q|k|v) x heads, so a tensor split cuts
    # between q, k and v rather than between heads: XLA inserts the reshard; it stays correct at any size.
    # Full-size dims (64, 256, 768, 3072, 4096, 9216, 12288, 15360, 21504) divide by fsdp x tensor up to 8.
    "flux": (
        (r"(^|\.)(bias|scale)$", P()),
        (r"double_blocks\.\d+\.(img|txt)_attn\.qkv\.kernel$", P("fsdp", "tensor")),
        (r"double_blocks\.\d+\.(img|txt)_attn\.proj\.kernel$", P("tensor", "fsdp")),
        (r"double_blocks\.\d+\.(img|txt)_mlp\.linear_1\.kernel$", P("fsdp", "tensor")),
        (r"double_blocks\.\d+\.(img|txt)_mlp\.linear_2\.kernel$", P("tensor", "fsdp")),
        (r"single_blocks\.\d+\.linear1\.kernel$", P("fsdp", "tensor")),
        (r"single_blocks\.\d+\.linear2\.kernel$", P("tensor", "fsdp")),
        (r"(^|\.)kernel$", P("fsdp", None)),
        (".*", P()),
    ),
}

# Logical activation axis names -> mesh axes (see `constrain`).
LOGICAL_AXES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "tokens": "context",
    "heads": "tensor",
    "embed": None,
}

LORA_A_NAMES = ("lora_a", "lora_A", "lora_down")
LORA_B_NAMES = ("lora_b", "lora_B", "lora_up")


class ShardingError(ValueError):
    """A mesh config, rule set or parameter placement is invalid."""


# ----------------------------------------------------------------------------------------------------- mesh

def mesh_shape(config: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Resolves {axis: size} with at most one -1 ("the rest") against the device count.

    Missing axes have size 1; an empty/None config puts every device on fsdp.
    """
    config = dict(config or {"fsdp": -1})
    unknown = set(config) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {a: int(config.get(a, 1)) for a in MESH_AXES}
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ShardingError(f"only one mesh axis may be -1 (the rest), got {rest}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % fixed:
            raise ShardingError(f"mesh {sizes}: {num_devices} devices do not divide by the fixed axes' product {fixed}")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(f"mesh {sizes} has {fixed} slots but there are {num_devices} devices")
    return sizes


def make_mesh(config: Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp", "context", "tensor") mesh from {axis: size} (-1 = the rest).

    Axis types are Auto: XLA propagates shardings, and a sharded contracting dimension is legal (the
    Explicit default of recent jax raises on it).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


# ------------------------------------------------------------------------------------------ metadata key

# Flax renamed the metadata key ("sharding" -> "sharding_names" -> "out_sharding"); this is the one place
# that knows the spelling.
_FLAX_VERSION = tuple(int(x) for x in re.findall(r"\d+", flax.__version__)[:2])
SHARDING_KEY = "out_sharding" if _FLAX_VERSION >= (0, 12) else "sharding_names"


def sharding_metadata(spec: P | Sequence | None) -> dict[str, tuple]:
    """Keyword metadata for an nnx.Variable (or LoRA `a_metadata=`) that places it by `spec`."""
    return {SHARDING_KEY: tuple(spec) if spec is not None else ()}


def variable_spec(var: nnx.Variable) -> P | None:
    """The PartitionSpec a variable carries in its metadata, or None."""
    names = var.get_metadata().get(SHARDING_KEY)
    return None if names is None else P(*names)


def set_variable_spec(var: nnx.Variable, spec: P) -> None:
    var.set_metadata(**sharding_metadata(spec))


# --------------------------------------------------------------------------------------------- rules

@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one state leaf goes: its spec and why (the rule pattern, or the LoRA host it follows)."""

    path: str
    shape: tuple[int, ...]
    spec: P
    rule: str


def get_rules(rules: str | Sequence[Sequence]) -> tuple[Rule, ...]:
    """A named rule set or a list of (regex, spec) pairs -> validated ((regex, PartitionSpec), ...).

    Specs may be given as PartitionSpec, tuple/list of axis names (or None, or tuples of names), or None.
    """
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ShardingError(f"unknown sharding rule set {rules!r}; known: {sorted(RULE_SETS)}")
        rules = RULE_SETS[rules]
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ShardingError(f"sharding rule #{i} {rule!r} is not a (regex, spec) pair")
        pattern, spec = rule
        try:
            re.compile(pattern)
        except re.error as e:
            raise ShardingError(f"sharding rule #{i}: bad regex {pattern!r}: {e}") from None
        spec = spec if isinstance(spec, P) else P() if spec is None else P(*spec)
        for names in spec:
            for name in (names if isinstance(names, tuple) else (names,)):
                if name is not None and name not in MESH_AXES:
                    raise ShardingError(f"sharding rule #{i} {pattern!r}: unknown mesh axis {name!r} in {spec}")
        out.append((pattern, spec))
    if not out:
        raise ShardingError("empty sharding rule list; end it with a catch-all ('.*', P())")
    return tuple(out)


def _axis_size(mesh: Mesh, names) -> int:
    if names is None:
        return 1
    return math.prod(mesh.shape[n] for n in (names if isinstance(names, tuple) else (names,)))


def check_divides(path: str, shape: Sequence[int], spec: P, mesh: Mesh, rule: str) -> None:
    """Raises ShardingError naming the parameter and spec when `spec` cannot shard `shape` on `mesh`."""
    if len(spec) > len(shape):
        raise ShardingError(f"{path} {tuple(shape)}: spec {spec} (rule {rule!r}) has more entries than the array "
                            "has dims")
    for dim, names in zip(shape, spec):
        size = _axis_size(mesh, names)
        if dim % size:
            raise ShardingError(f"{path} {tuple(shape)}: spec {spec} (rule {rule!r}) does not divide dim {dim} "
                                f"by mesh axes {names} of size {size}")


def _lora_role(path: str) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    return "a" if leaf in LORA_A_NAMES else "b" if leaf in LORA_B_NAMES else None


def _find_host(path: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    parts = path.split(".")[:-1]
    while parts:
        cand = ".".join(parts + ["kernel"])
        if cand in shapes:
            return cand
        parts.pop()
    return None


def _lora_spec(role: str, shape, host_shape, host_spec: P) -> P | None:
    """The adapter's spec from its host's, or None when the shapes do not line up as [.., I, r] / [.., r, O]."""
    if len(shape) != len(host_shape) or len(shape) < 2:
        return None
    host = tuple(host_spec) + (None,) * (len(host_shape) - len(host_spec))
    lead = host[:-2]
    if role == "a" and shape[-2] == host_shape[-2] and shape[:-2] == host_shape[:-2]:
        return P(*lead, host[-2], None)
    if role == "b" and shape[-1] == host_shape[-1] and shape[:-2] == host_shape[:-2]:
        return P(*lead, None, host[-1])
    return None


def resolve(shapes: Mapping[str, Sequence[int]], rules: str | Sequence[Sequence], mesh: Mesh) -> dict[str, Placement]:
    """Places every leaf of {path: shape}.

    Raises:
      ShardingError: a leaf matching no rule, or a spec that does not divide its leaf's shape (all such
        problems are listed together).
    """
    rules = get_rules(rules)
    shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
    compiled = [(re.compile(p), p, s) for p, s in rules]
    by_rule: dict[str, Placement] = {}
    errors = []
    for path, shape in shapes.items():
        hit = next(((p, s) for rx, p, s in compiled if rx.search(path)), None)
        if hit is None:
            errors.append(f"{path} {shape}: matches no sharding rule (end the rules with a catch-all ('.*', P()))")
            continue
        by_rule[path] = Placement(path, shape, hit[1], hit[0])
    out = {}
    for path, shape in shapes.items():
        if path not in by_rule:
            continue
        placement = by_rule[path]
        role = _lora_role(path)
        host = _find_host(path, shapes) if role else None
        if host is not None and host in by_rule:
            spec = _lora_spec(role, shape, shapes[host], by_rule[host].spec)
            if spec is not None:
                placement = Placement(path, shape, spec, f"lora of {host}")
        try:
            check_divides(path, shape, placement.spec, mesh, placement.rule)
        except ShardingError as e:
            errors.append(str(e))
        out[path] = placement
    if errors:
        raise ShardingError("invalid parameter sharding:\n  " + "\n  ".join(errors))
    return out


def state_shapes(module_or_state, var_type=nnx.Variable) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of the array leaves of a (possibly abstract) module or state."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, var_type)
    out = {}
    for p, v in nnx.to_flat_state(state):
        val = v.get_value() if isinstance(v, nnx.Variable) else v
        if hasattr(val, "shape"):
            out[path_str(p)] = tuple(val.shape)
    return out


def format_table(placements: Mapping[str, Placement]) -> str:
    """A plain-text table (param, shape, rule, spec), one row per leaf."""
    rows = [("param", "shape", "rule", "spec")]
    rows += [(p.path, str(p.shape), p.rule, str(tuple(p.spec))) for p in placements.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def param_shardings(module_or_state, rules: str | Sequence[Sequence], mesh: Mesh, *, var_type=nnx.Variable,
                    print_fn: Callable[[str], None] | None = print) -> dict[str, NamedSharding]:
    """{path: NamedSharding} for the leaves of a (possibly abstract, from nnx.eval_shape) module or state.

    The placement table is printed with `print_fn` on process 0 (None: silent).
    """
    placements = resolve(state_shapes(module_or_state, var_type), rules, mesh)
    if print_fn is not None and jax.process_index() == 0:
        print_fn(format_table(placements))
    return {k: NamedSharding(mesh, p.spec) for k, p in placements.items()}


def shard_module(module: nnx.Module, rules: str | Sequence[Sequence], mesh: Mesh, *,
                 print_fn: Callable[[str], None] | None = print) -> dict[str, NamedSharding]:
    """Places a live module's variables in place and records each spec in the variable's metadata.

    The metadata lets `nnx.Optimizer` (created afterwards under `jax.set_mesh(mesh)`) give its moment
    buffers the same placement, and `nnx.get_partition_spec` recover the specs.
    Returns {path: NamedSharding}.
    """
    shardings = param_shardings(module, rules, mesh, print_fn=print_fn)
    for p, var in nnx.to_flat_state(nnx.state(module, nnx.Variable)):
        key = path_str(p)
        if key in shardings:
            set_variable_spec(var, shardings[key].spec)
            var.set_value(jax.device_put(var.get_value(), shardings[key]))
    return shardings


def _placed_state(abstract: nnx.Module, shardings: Mapping[str, NamedSharding], leaf):
    """(graphdef, state) of an abstract module with each leaf mapped by leaf(value, sharding); specs recorded."""
    graphdef, state = nnx.split(abstract)
    leaves = []
    for p, var in nnx.to_flat_state(state):
        key = path_str(p)
        if key in shardings:
            set_variable_spec(var, shardings[key].spec)
            var = var.replace(leaf(var.get_value(), shardings[key]))
        leaves.append((p, var))
    return graphdef, nnx.from_flat_state(leaves)


def abstract_sharded(make: Callable[[], nnx.Module], rules: str | Sequence[Sequence], mesh: Mesh, *,
                     print_fn: Callable[[str], None] | None = print):
    """An abstract module (no allocation) whose leaves are ShapeDtypeStruct carrying their NamedSharding.

    This is the target to restore or load into: orbax and `omnijax.params.build_with_params` read each array
    straight into its shards. Returns (abstract module, {path: NamedSharding}).
    """
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(make)
    shardings = param_shardings(abstract, rules, mesh, print_fn=print_fn)
    graphdef, state = _placed_state(abstract, shardings,
                                    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
    return nnx.merge(graphdef, state), shardings


def init_sharded(make: Callable[[], nnx.Module], rules: str | Sequence[Sequence], mesh: Mesh, *,
                 print_fn: Callable[[str], None] | None = print):
    """Runs `make()` (random init) under jit with every output leaf born on its shards: the full model never
    sits on one device. Specs are recorded in the variables' metadata as `shard_module` does.

    Returns (module, {path: NamedSharding}).
    """
    abstract, shardings = abstract_sharded(make, rules, mesh, print_fn=print_fn)
    graphdef, target = nnx.split(abstract)
    out_shardings = jax.tree.map(lambda x: x.sharding, target)
    with jax.set_mesh(mesh):
        def init():
            module = make()
            for p, var in nnx.to_flat_state(nnx.state(module, nnx.Variable)):
                if path_str(p) in shardings:
                    set_variable_spec(var, shardings[path_str(p)].spec)
            return nnx.split(module)[1]

        state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state), shardings


# ----------------------------------------------------------------------------------------- activations

def logical_spec(*names: str | None, rules: Mapping[str, str | tuple[str, ...] | None] | None = None) -> P:
    """PartitionSpec from logical axis names ("batch", "tokens", "heads", "embed", None)."""
    rules = LOGICAL_AXES if rules is None else rules
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise ShardingError(f"unknown logical axis names {unknown}; known: {sorted(rules)}")
    return P(*(None if n is None else rules[n] for n in names))


def constrain(x: jax.Array, *names: str | None, mesh: Mesh | None = None, rules=None) -> jax.Array:
    """with_sharding_constraint by logical axis names, one per dim of `x`.

    A no-op when no mesh is given or set (`jax.set_mesh`), so model code can call it unconditionally.
    Mesh axes that do not divide the dim they would shard are dropped for that dim (e.g. batch 1 over
    data x fsdp), because a constraint is a hint, not a placement contract.
    """
    if len(names) != x.ndim:
        raise ShardingError(f"constrain: {len(names)} axis names {names} for an array of rank {x.ndim}")
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        if abstract.empty:
            return x
        mesh_sizes = dict(zip(abstract.axis_names, abstract.axis_sizes))
    else:
        mesh_sizes = dict(mesh.shape)
    spec = []
    for dim, axes in zip(x.shape, logical_spec(*names, rules=rules)):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh_sizes)
        keep, size = [], 1
        for a in axes:
            if dim % (size * mesh_sizes[a]) == 0:
                keep.append(a)
                size *= mesh_sizes[a]
        spec.append(tuple(keep) if len(keep) > 1 else keep[0] if keep else None)
    target = P(*spec) if mesh is None else NamedSharding(mesh, P(*spec))
    return jax.lax.with_sharding_constraint(x, target)


def batch_sharding(mesh: Mesh, ndim: int, *, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Sharding for a global batch array [B, ...]: B split over `axes`, the rest replicated."""
    return NamedSharding(mesh, P(tuple(axes), *([None] * (ndim - 1))))


def host_to_global(batch, mesh: Mesh, *, axes: Sequence[str] = ("data", "fsdp")):
    """Places a (single-process) pytree of host arrays [B, ...] on the mesh with B split over `axes`."""
    n = _axis_size(mesh, tuple(axes))

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ShardingError(f"batch leaf {x.shape}: leading dim does not divide by mesh axes {tuple(axes)} ({n})")
        return jax.device_put(x, batch_sharding(mesh, x.ndim, axes=axes))

    return jax.tree.map(put, batch)
