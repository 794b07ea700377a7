"""The registry of merge operators, by the name used in the config's `merge_method`."""

from __future__ import annotations

from bigmerge.errors import ConfigError
from bigmerge.ops.base import MergeOp
from bigmerge.ops.dam import DamOp
from bigmerge.ops.data_informed import FisherOp, RegMeanOp
from bigmerge.ops.geometric import ModelStockOp, NearSwapOp
from bigmerge.ops.linear import LinearOp
from bigmerge.ops.passthrough import PassthroughOp
from bigmerge.ops.spherical import KarcherOp, MultiSlerpOp, NuSlerpOp, SlerpOp
from bigmerge.ops.task_vector.breadcrumbs import BreadcrumbsOp, BreadcrumbsTiesOp
from bigmerge.ops.task_vector.dare import DareLinearOp, DareTiesOp
from bigmerge.ops.task_vector.della import DellaLinearOp, DellaOp
from bigmerge.ops.task_vector.sce import SceOp
from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp, TiesOp

REGISTRY: dict[str, type[MergeOp]] = {op.name: op for op in (LinearOp, TaskArithmeticOp, TiesOp)}
REGISTRY[BreadcrumbsOp.name] = BreadcrumbsOp
REGISTRY[BreadcrumbsTiesOp.name] = BreadcrumbsTiesOp
REGISTRY[SceOp.name] = SceOp
REGISTRY[DareLinearOp.name] = DareLinearOp
REGISTRY[DareTiesOp.name] = DareTiesOp
REGISTRY[DellaOp.name] = DellaOp
REGISTRY[DellaLinearOp.name] = DellaLinearOp
REGISTRY[FisherOp.name] = FisherOp
REGISTRY[RegMeanOp.name] = RegMeanOp
REGISTRY[SlerpOp.name] = SlerpOp
REGISTRY[NuSlerpOp.name] = NuSlerpOp
REGISTRY[MultiSlerpOp.name] = MultiSlerpOp
REGISTRY[KarcherOp.name] = KarcherOp
REGISTRY[ModelStockOp.name] = ModelStockOp
REGISTRY[NearSwapOp.name] = NearSwapOp
REGISTRY[DamOp.name] = DamOp
REGISTRY[PassthroughOp.name] = PassthroughOp


def get_op(name: str) -> MergeOp:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown merge_method {name!r}; this version knows: {known}") from None
