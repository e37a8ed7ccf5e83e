"""The shared last steps of every loader: shapes for config inference, then convert and build the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flax import nnx
from tqdm.auto import tqdm

from converters.engine import TRANSFORMS, Table, convert, plan
from omnijax.params import build_with_params, param_shapes


def mapped_shapes(src: Mapping, table: Table) -> dict[str, tuple[int, ...]]:
    """{target path: shape after the transform} for the keys `table` maps. Transforms are views on the
    memory-mapped arrays, so nothing is read."""
    mapping, _, _ = plan(list(src.keys()), table)
    return {target: TRANSFORMS[tf](src[key]).shape for key, (target, tf) in mapping.items()}


def convert_and_build(src: Mapping, table: Table, make: Callable[[], nnx.Module], *, shardings=None,
                      progress: bool = False) -> nnx.Module:
    """Applies `table` to `src` against the parameters of `make()` (built abstractly) and returns the model.

    `shardings`: {param path: Sharding}, or a function of the abstract model returning it (converters.registry).
    """
    abstract = nnx.eval_shape(make)
    targets = param_shapes(abstract)
    if callable(shardings):
        shardings = shardings(abstract)
    bar = (lambda it: tqdm(it, desc=f"converting {table.name}", unit="tensor")) if progress else None
    return build_with_params(make, convert(src, table, targets, progress=bar), shardings)
