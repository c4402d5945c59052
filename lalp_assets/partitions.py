"""Partitions and what a run selects.

Teachers are dynamic partitions: "a new teacher arrived" scores that teacher alone. With
`LALP_SHARDS` > 1, `step_scores` fans out over teacher × shard (a shard is a stable hash of
`prompt_id`, `lalp_resources.pipeline.shard_of`), so one backfill keeps as many GPUs busy as
there are runs; the per-teacher assets around it wait for every shard of their teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from lalp_resources.settings import Settings

teacher_partitions = dg.DynamicPartitionsDefinition(name="teacher")


def scoring_partitions(shards: int) -> dg.PartitionsDefinition:
    if shards <= 1:
        return teacher_partitions
    return dg.MultiPartitionsDefinition(
        {"teacher": teacher_partitions, "shard": dg.StaticPartitionsDefinition([str(i) for i in range(shards)])}
    )


def by_teacher(shards: int):
    """How a per-teacher asset maps onto the scoring partitions (None: the same partitions)."""
    return None if shards <= 1 else dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="teacher")


def backfill_policy(settings: Settings) -> dg.BackfillPolicy:
    # locally one run (the student loads once); on a cluster one run per partition
    return dg.BackfillPolicy.multi_run(1) if settings.backfill == "multi" else dg.BackfillPolicy.single_run()


@dataclass(frozen=True)
class Scope:
    """The partitions one materialization selected: teachers, and for scoring the shards."""

    teachers: list[str]
    shards: dict[str, set[int]] | None  # None: every shard of each teacher

    def describe(self) -> str:
        if self.shards is None:
            return f"teacher(s) {self.teachers}"
        return "; ".join(f"{t} shard(s) {sorted(s)}" for t, s in self.shards.items())


def scope_of(context: dg.AssetExecutionContext) -> Scope:
    keys = list(context.partition_keys)
    if keys and isinstance(keys[0], dg.MultiPartitionKey):
        shards: dict[str, set[int]] = {}
        for k in keys:
            d = k.keys_by_dimension
            shards.setdefault(d["teacher"], set()).add(int(d["shard"]))
        return Scope(sorted(shards), shards)
    return Scope(sorted(keys), None)


def latest_materializations(context: dg.AssetExecutionContext) -> dict[str, dg.AssetMaterialization]:
    """The last materialization of each selected partition key (as a string) that has one."""
    keys = [str(k) for k in context.partition_keys]
    instance = context.instance
    latest = instance.get_latest_storage_id_by_partition(
        context.asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, partitions=set(keys))
    if not latest:
        return {}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=context.asset_key, storage_ids=list(latest.values())), limit=len(latest)).records
    return {r.partition_key: r.asset_materialization for r in records if r.partition_key is not None}


def settled_partitions(context: dg.AssetExecutionContext, version: str) -> set[str]:
    """The selected partition keys (as strings) whose last materialization of this asset ran code
    version `version`: every row they hold was written under today's settings, so a response found
    there can be passed over. A run with other settings (or none yet) settles nothing."""
    return {k for k, m in latest_materializations(context).items() if m.tags.get("dagster/code_version") == version}
