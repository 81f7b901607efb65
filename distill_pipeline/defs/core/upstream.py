"""An asset's upstream outputs, read through the accessor of an asset it declares as a dependency."""

from typing import TypeVar

import dagster as dg

from distill_pipeline.core.published import Published
from distill_pipeline.core.store import ObjectStore

P = TypeVar("P", bound=Published)


def upstream(context: dg.AssetExecutionContext, store: ObjectStore, accessor: type[P]) -> P:
    """``accessor`` over ``store``, once it is sure the running asset declares ``accessor``'s asset
    as a dependency: what an asset reads is then what its lineage in the UI says it reads."""
    key = dg.AssetKey(accessor.ASSET)
    declared = context.assets_def.asset_deps[context.asset_key]
    if key not in declared:
        raise dg.DagsterInvariantViolationError(
            f"{context.asset_key.to_user_string()} reads {accessor.ASSET} without declaring it as a dependency"
        )
    return accessor(store)


def fan_in_keys(context: dg.AssetExecutionContext, accessor: type[Published]) -> list[str]:
    """The partitions of ``accessor``'s asset that the declared partition mapping maps onto this run."""
    return list(context.asset_partition_keys_for_input(accessor.ASSET))
