"""Bytes that ZeRO-3 gathers, counted where DeepSpeed gathers them.

DeepSpeed's parameter coordinator gathers every partitioned parameter a module needs, before its
forward and again before its backward, in one private method; wrapping that method counts each
parameter that was not already whole (`ds_status` NOT_AVAILABLE) with its full size, which is
what the all-gather moves into each process (and, with offload, what crosses from host memory).
The counts are per process; every process gathers the same parameters.
"""

from __future__ import annotations

from typing import Any

_METHOD = "_PartitionedParameterCoordinator__all_gather_params_"


class GatherCounter:
    """Running totals of the parameters gathered in this process: `bytes`, `params` (gather count)
    and `by_source` (bytes per source index, from the DAM layers' `weight_K` / `bias_K` names)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.params = 0
        self.by_source: dict[int, int] = {}
        self._names: dict[int, int] = {}  # id(param) -> source index

    def name_sources(self, module: Any) -> None:
        """Remember which source each frozen weight belongs to (weight_K, bias_K)."""
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            kind, _, k = leaf.rpartition("_")
            if kind in ("weight", "bias") and k.isdigit():
                self._names[id(p)] = int(k)

    def count(self, params: Any) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                b = int(p.ds_numel) * p.ds_tensor.element_size()
                self.bytes += b
                self.params += 1
                k = self._names.get(id(p))
                if k is not None:
                    self.by_source[k] = self.by_source.get(k, 0) + b

    def snapshot(self) -> tuple[int, int]:
        return self.bytes, self.params


_counter: GatherCounter | None = None


def install() -> GatherCounter:
    """Count from now on (idempotent: one counter per process)."""
    global _counter
    if _counter is not None:
        return _counter
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    original = getattr(PartitionedParameterCoordinator, _METHOD)
    counter = GatherCounter()

    def counted(self: Any, params: Any, forward: bool, quantize: bool = False) -> None:
        counter.count(params)
        original(self, params, forward, quantize)

    setattr(PartitionedParameterCoordinator, _METHOD, counted)
    _counter = counter
    return counter
