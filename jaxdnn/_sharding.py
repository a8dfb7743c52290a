"""How XLA's SPMD partitioner splits a jaxdnn call across devices.

Without a rule XLA all-gathers every operand of a custom call and runs it on the global
batch on every device. Each primitive therefore declares one `Partitioning` (a factor
spec, built from its operands' shapes and its parameters), and this module derives from
it everything the partitioner needs:

* Shardy's `sharding_rule` (propagation) and GSPMD's `infer_sharding_from_operands`;
* `partition()`: which operand dimensions stay sharded (the rest is gathered), the
  per-shard call with every shape-carrying parameter made local, and a `psum` over the
  mesh axes of each sharded factor a result sums over;
* the result types under explicit-sharding meshes (`result_specs`).

The lowering wraps a per-shard twin of the primitive in `custom_partitioning`, inside the
public primitive's lowering rule, so the primitive keeps its abstract evaluation, AD and
batching rules (custom_partitioning itself has none). On one device, and inside a fully
manual `shard_map`, custom_partitioning inlines the per-shard call: no cost.

A factor spec names one factor per dimension of every operand and result ("n c h w").
The same name means the same size. A factor missing from a result is summed over in it
(the kernel gradient has no N: it is the sum over the batch); where that sum is sharded,
the per-shard results are `psum`med. Non-linear reductions (batch-norm statistics)
replace the per-shard call with a `local` body of their own.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jaxdnn._compat import extend_axis_env, mlir, replicated_like

__all__ = ["Partitioning", "assign_axes", "layout_factors", "partitioned_lowering", "result_specs"]

Axes = tuple  # mesh axis names a factor is sharded over, major first


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """How one call of a primitive may be split across devices.

    operands, results: one factor string per operand / result, a name per dimension.
    shardable: the factors that may stay sharded (the rest are gathered).
    shape_params: parameter name -> the factor string of the shape it holds (made local
      for the per-shard call: each entry divided by its factor's shard count); an int
      parameter (a byte count) has one factor.
    local: an optional per-shard body, local(axes, bind, *operands, **params) ->
      results, where `axes` maps each sharded factor to its mesh axes and `bind` is the
      per-shard primitive; it replaces the default (`bind`, then a psum over the
      factors a result lacks).
    tied: factor -> the factor whose mesh axes it always takes (an opaque per-sample
      buffer, such as the RNN's reserve space, split exactly as the batch it belongs to).
    """
    operands: tuple[str, ...]
    results: tuple[str, ...]
    shardable: frozenset[str] = frozenset()
    shape_params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    local: Callable[..., Sequence[Any]] | None = None
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def operand_factors(self) -> list[list[str]]:
        return [s.split() for s in self.operands]

    def result_factors(self) -> list[list[str]]:
        return [s.split() for s in self.results]

    def factor_order(self) -> list[str]:
        """Every factor, in order of first appearance (Shardy wants its special factors so)."""
        order: list[str] = []
        for factors in self.operand_factors() + self.result_factors():
            order += [f for f in factors if f not in order]
        return order

    def summed(self) -> list[str]:
        """Factors of the operands that no result has."""
        in_results = {f for r in self.result_factors() for f in r}
        return [f for f in self.factor_order() if f not in in_results]

    def sdy_rule(self, shapes: Sequence[Sequence[int]]) -> tuple[str, dict, dict]:
        """Shardy's sharding_rule for operands and results of `shapes`: the einsum-like
        string, its special factors and the sizes of factors seen only inside compound
        dimensions. A tied follower is written as the minor part of a compound dimension
        `(leader follower)`, so that Shardy splits it as its leader (the reserve space,
        sequence-major, is split with the batch)."""
        sizes: dict[str, int] = {}
        for factors, shape in zip(self.operand_factors() + self.result_factors(), shapes):
            sizes.update({f: n for f, n in zip(factors, shape) if f not in sizes})
        compound = {f: leader for f, leader in self.tied.items()
                    if f in sizes and sizes.get(leader) and sizes[f] % sizes[leader] == 0}

        def render(factors: str) -> str:
            return " ".join(f"({compound[f]} {f})" if f in compound else f
                            for f in factors.split())

        text = (", ".join(map(render, self.operands)) + " -> "
                + ", ".join(map(render, self.results)))
        summed = self.summed()
        order = self.factor_order()
        reduction = tuple(f for f in order if f in summed and f in self.shardable)
        replicated = tuple(f for f in order if f not in self.shardable)
        kinds = {}
        if reduction:
            kinds["reduction_factors"] = reduction
        if replicated:
            kinds["need_replication_factors"] = replicated
        return text, kinds, {f: sizes[f] // sizes[leader] for f, leader in compound.items()}


def layout_factors(layout: str, *, batch: str = "n", channel: str = "c",
                   spatial_suffix: str = "") -> str:
    """The factor string of an array laid out as `layout` ('NCHW', 'NDHWC', ...): one
    factor per letter, N named `batch`, C `channel`, each spatial letter lower-cased with
    `spatial_suffix` (so that an output's spatial extents, which differ, get other names)."""
    names = {"N": batch, "C": channel}
    return " ".join(names.get(ch, ch.lower() + spatial_suffix) for ch in layout)


def _entry_axes(entry) -> Axes:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def assign_axes(spec: Partitioning, shapes: Sequence[Sequence[int]],
                pspecs: Sequence[Sequence | None], mesh_shape: Mapping[str, int]
                ) -> dict[str, Axes]:
    """The mesh axes each shardable factor keeps, read off the operands' partition specs:
    the first operand dimension sharded on a factor wins, a mesh axis serves one factor,
    and a factor keeps its axes only when its size divides by their product (else it is
    gathered: an odd batch runs whole, still correct)."""
    assigned: dict[str, Axes] = {}
    used: set[str] = set()
    for factors, shape, pspec in zip(spec.operand_factors(), shapes, pspecs):
        pspec = tuple(pspec or ())
        for dim, factor in enumerate(factors):
            if (factor in assigned or factor not in spec.shardable or factor in spec.tied
                    or dim >= len(pspec)):
                continue
            axes = _entry_axes(pspec[dim])
            if not axes or used & set(axes) or any(a not in mesh_shape for a in axes):
                continue
            if shape[dim] % math.prod(mesh_shape[a] for a in axes):
                continue
            assigned[factor] = axes
            used |= set(axes)
    sizes = _factor_sizes(spec, shapes)
    for follower, leader in spec.tied.items():
        axes = assigned.get(leader, ())
        if axes and sizes.get(follower, 0) % math.prod(mesh_shape[a] for a in axes) == 0:
            assigned[follower] = axes
        elif axes:  # the follower cannot split as its leader does: neither splits
            del assigned[leader]
    return assigned


def _factor_sizes(spec: Partitioning, shapes) -> dict[str, int]:
    return {f: n for factors, shape in zip(spec.operand_factors(), shapes)
            for f, n in zip(factors, shape)}


def _pspec(factors: Sequence[str], assigned: Mapping[str, Axes]) -> PartitionSpec:
    entries = []
    for f in factors:
        axes = assigned.get(f, ())
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def result_specs(spec: Partitioning, shapes, pspecs, mesh_shape) -> list[PartitionSpec]:
    """The results' partition specs for operands sharded as `pspecs` (explicit-sharding
    result types, GSPMD's inference)."""
    assigned = assign_axes(spec, shapes, pspecs, mesh_shape)
    return [_pspec(f, assigned) for f in spec.result_factors()]


def _localized(spec: Partitioning, params: dict, assigned: Mapping[str, Axes],
               mesh_shape: Mapping[str, int]) -> dict:
    def shards(factor: str) -> int:
        return math.prod(mesh_shape[a] for a in assigned.get(factor, ()))

    params = dict(params)
    for name, factor_string in spec.shape_params.items():
        value, factors = params[name], factor_string.split()
        if isinstance(value, int):  # a size in bytes or elements, of one factor
            params[name] = value // shards(factors[0])
        else:
            params[name] = type(value)(n // shards(f) for n, f in zip(value, factors))
    return params


def _per_shard_body(spec: Partitioning, bind_local: Callable, params: dict,
                    assigned: Mapping[str, Axes]) -> Callable:
    """The function XLA runs on every shard."""
    if spec.local is not None:
        return lambda *args: list(spec.local(assigned, bind_local, *args, **params))
    operand_factors = {f for fs in spec.operand_factors() for f in fs}
    result_sums = []
    for factors in spec.result_factors():
        # A tied follower holds its leader (the reserve space is per sequence): a result
        # with the follower is no sum over the leader, and the follower is no sum itself.
        held = set(factors) | {spec.tied[f] for f in factors if f in spec.tied}
        axes = [a for f in spec.factor_order() if f in operand_factors and f not in held
                and f not in spec.tied for a in assigned.get(f, ())]
        result_sums.append(tuple(dict.fromkeys(axes)))

    def body(*args):
        outs = bind_local(*args, **params)
        return [jax.lax.psum(o, axes) if axes else o for o, axes in zip(outs, result_sums)]
    return body


def _named_specs(arg_shapes) -> list | None:
    """The operands' partition specs, or None where a sharding is not a NamedSharding
    (partially manual shard_map hands the callbacks GSPMD shardings and an empty mesh)."""
    specs = []
    for a in arg_shapes:
        sharding = getattr(a, "sharding", None)
        if sharding is None:  # GSPMD has no sharding for it yet: whole
            specs.append(PartitionSpec())
        elif isinstance(sharding, NamedSharding):
            specs.append(sharding.spec)
        else:
            return None
    return specs


def partitioned_lowering(bind_local: Callable, spec_fn: Callable[..., Partitioning],
                         name: str) -> Callable:
    """A lowering rule for a primitive whose per-shard call is `bind_local(*args,
    **params) -> list of results`, split across devices as `spec_fn(*avals, **params)`
    says."""

    def lowering(ctx, *args, **params):
        spec = spec_fn(*ctx.avals_in, **params)
        in_shapes = [tuple(a.shape) for a in ctx.avals_in]

        def replicated_plan(mesh, arg_shapes):
            if mesh.empty:  # partially manual shard_map: GSPMD shardings, no named mesh
                sharding = replicated_like(arg_shapes[0].sharding)
            else:
                sharding = NamedSharding(mesh, PartitionSpec())
            return (mesh, lambda *a: list(bind_local(*a, **params)),
                    [sharding] * len(spec.results), (sharding,) * len(arg_shapes))

        def plan(mesh, arg_shapes):
            pspecs = _named_specs(arg_shapes)
            if pspecs is None or mesh.empty:
                return None
            mesh_shape = dict(mesh.shape)
            assigned = assign_axes(spec, in_shapes, pspecs, mesh_shape)
            local_params = _localized(spec, params, assigned, mesh_shape)
            body = _per_shard_body(spec, bind_local, local_params, assigned)
            arg_shardings = tuple(NamedSharding(mesh, _pspec(f, assigned))
                                  for f in spec.operand_factors())
            result_shardings = [NamedSharding(mesh, _pspec(f, assigned))
                                for f in spec.result_factors()]
            # Trace the body on the shards' shapes now: a mismatch falls back here
            # instead of raising inside XLA's partitioner (which aborts).
            local_args = [jax.ShapeDtypeStruct(s.shard_shape(a.shape), a.dtype)
                          for s, a in zip(arg_shardings, arg_shapes)]
            with extend_axis_env(mesh_shape):  # the body's psums name the mesh axes
                outs = jax.eval_shape(body, *local_args)
            expected = [s.shard_shape(tuple(r.shape)) for s, r in
                        zip(result_shardings, ctx.avals_out)]
            if [tuple(o.shape) for o in outs] != [tuple(e) for e in expected]:
                raise ValueError(f"per-shard shapes {[o.shape for o in outs]} != {expected}")
            return mesh, body, result_shardings, arg_shardings

        def partition(mesh, arg_shapes, result_shape):
            try:
                found = plan(mesh, arg_shapes)
            except Exception as e:  # never raise into XLA: run the call whole instead
                warnings.warn(f"jaxdnn: {name} could not be partitioned ({e}); it runs on "
                              "whole (gathered) operands", stacklevel=2)
                found = None
            return found if found is not None else replicated_plan(mesh, arg_shapes)

        def infer(mesh, arg_shapes, result_shape):
            pspecs = _named_specs(arg_shapes)
            if pspecs is None or mesh.empty:  # XLA wants a sharding: whole results
                return replicated_plan(mesh, arg_shapes)[2]
            return [NamedSharding(mesh, p) for p in
                    result_specs(spec, in_shapes, pspecs, dict(mesh.shape))]

        def call(*operands):
            return list(bind_local(*operands, **params))

        partitioned = custom_partitioning(call)
        rule, kinds, factor_sizes = spec.sdy_rule(
            in_shapes + [tuple(a.shape) for a in ctx.avals_out])
        partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer,
                                  sharding_rule=rule, **kinds, **factor_sizes)
        return mlir.lower_fun(partitioned, multiple_results=True)(ctx, *args)

    return lowering

