"""The registry of merge operators, by the name used in the config's `merge_method`."""

from __future__ import annotations

from bigmerge.errors import ConfigError
from bigmerge.ops.base import MergeOp
from bigmerge.ops.geometric import ModelStockOp, NearSwapOp
from bigmerge.ops.linear import LinearOp
from bigmerge.ops.spherical import KarcherOp, MultiSlerpOp, NuSlerpOp, SlerpOp
from bigmerge.ops.task_arithmetic import TaskArithmeticOp, TiesOp

# One line per operator (keep it that way: several families register here).
REGISTRY: dict[str, type[MergeOp]] = {}
REGISTRY[LinearOp.name] = LinearOp
REGISTRY[TaskArithmeticOp.name] = TaskArithmeticOp
REGISTRY[TiesOp.name] = TiesOp
REGISTRY[SlerpOp.name] = SlerpOp
REGISTRY[NuSlerpOp.name] = NuSlerpOp
REGISTRY[MultiSlerpOp.name] = MultiSlerpOp
REGISTRY[KarcherOp.name] = KarcherOp
REGISTRY[ModelStockOp.name] = ModelStockOp
REGISTRY[NearSwapOp.name] = NearSwapOp


def get_op(name: str) -> MergeOp:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown merge_method {name!r}; this version knows: {known}") from None
