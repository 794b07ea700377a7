"""The registry of merge operators, by the name used in the config's `merge_method`.

Registering an operator is one line here: import its class (as an explicit re-export). Every
MergeOp class this module imports is registered under its `name`; see docs/operators.md.
"""

from __future__ import annotations

from bigmerge.errors import ConfigError
from bigmerge.ops.arcee_fusion import ArceeFusionOp as ArceeFusionOp
from bigmerge.ops.base import MergeOp
from bigmerge.ops.dam import DamOp as DamOp
from bigmerge.ops.data_informed import FisherOp as FisherOp
from bigmerge.ops.data_informed import RegMeanOp as RegMeanOp
from bigmerge.ops.geometric import ModelStockOp as ModelStockOp
from bigmerge.ops.geometric import NearSwapOp as NearSwapOp
from bigmerge.ops.linear import LinearOp as LinearOp
from bigmerge.ops.passthrough import PassthroughOp as PassthroughOp
from bigmerge.ops.ram import RamOp as RamOp
from bigmerge.ops.ram import RamPlusTlOp as RamPlusTlOp
from bigmerge.ops.spherical import KarcherOp as KarcherOp
from bigmerge.ops.spherical import MultiSlerpOp as MultiSlerpOp
from bigmerge.ops.spherical import NuSlerpOp as NuSlerpOp
from bigmerge.ops.spherical import SlerpOp as SlerpOp
from bigmerge.ops.task_vector.breadcrumbs import BreadcrumbsOp as BreadcrumbsOp
from bigmerge.ops.task_vector.breadcrumbs import BreadcrumbsTiesOp as BreadcrumbsTiesOp
from bigmerge.ops.task_vector.dare import DareLinearOp as DareLinearOp
from bigmerge.ops.task_vector.dare import DareTiesOp as DareTiesOp
from bigmerge.ops.task_vector.della import DellaLinearOp as DellaLinearOp
from bigmerge.ops.task_vector.della import DellaOp as DellaOp
from bigmerge.ops.task_vector.sce import SceOp as SceOp
from bigmerge.ops.task_vector.task_arithmetic import TaskArithmeticOp as TaskArithmeticOp
from bigmerge.ops.task_vector.task_arithmetic import TiesOp as TiesOp

REGISTRY: dict[str, type[MergeOp]] = {
    op.name: op
    for op in list(globals().values())
    if isinstance(op, type) and issubclass(op, MergeOp) and op is not MergeOp
}


def get_op(name: str) -> MergeOp:
    try:
        return REGISTRY[name]()
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown merge_method {name!r}; this version knows: {known}") from None
