"""Passing over a stage whose inputs have not changed since it last ran.

A rerun with nothing new (the nightly schedule, a `lalp run` after a small inbox change) must not
rebuild what depends only on unchanged rows. Each stage after scoring fingerprints what it reads:
per input table, the row count and the sum of a hash of each row's key and the run that wrote it
(a rewrite gives new run ids, so a new fingerprint) or of the whole row where a table has no run id
of its own. It fingerprints its own output the same way. When the last materialization of every
selected partition ran the same code version with the same input fingerprint, and the output still
holds what that materialization wrote, the stage keeps its table, reports the earlier metadata
with `passed_over`, and re-runs its checks on the stored table. Sums of hashes do not depend on
row order and, unlike XOR, do not cancel on duplicate rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import dagster as dg

from lalp_assets.partitions import latest_materializations

FINGERPRINT_KEY, OUTPUT_KEY = "inputs_fingerprint", "output_fingerprint"


@dataclass(frozen=True)
class Stamp:
    """One table's part of a fingerprint: `columns` hashed per row ("t" = the whole row), over
    the rows `where` selects (a SQL condition with `params`)."""

    table: str
    columns: str = "t"
    where: str = ""
    params: tuple = ()


def by_teacher(table: str, columns: str, teachers: Sequence[str]) -> Stamp:
    return Stamp(table, columns, "teacher IN (SELECT unnest(?))", (list(teachers),))


def fingerprint(con, stamps: Sequence[Stamp]) -> str:
    parts = []
    for s in stamps:
        where = f" WHERE {s.where}" if s.where else ""
        n, total = con.execute(
            f"SELECT count(*), coalesce(sum(hash({s.columns})::HUGEINT), 0) FROM {s.table} t{where}", list(s.params)
        ).fetchone()
        parts.append(f"{s.table}:{n}:{total}")
    return "|".join(parts)


def _latest(context: dg.AssetExecutionContext) -> list[dg.AssetMaterialization] | None:
    """The last materialization of each selected partition (of the asset, unpartitioned), or
    None where one has never materialized."""
    if not context.has_partition_key and not context.has_partition_key_range:
        event = context.instance.get_latest_materialization_event(context.asset_key)
        return [event.asset_materialization] if event and event.asset_materialization else None
    latest = latest_materializations(context)
    return list(latest.values()) if set(latest) == {str(k) for k in context.partition_keys} else None


def _text(md: dict, key: str) -> str | None:
    v = md.get(key)
    return None if v is None else str(getattr(v, "value", v))


def unchanged_since(context: dg.AssetExecutionContext, version: str, inputs: str, output: str) -> dict | None:
    """The last materialization's metadata when every selected partition last ran code version
    `version` on inputs with fingerprint `inputs` and left the output with fingerprint `output`
    (both as they are now); else None."""
    mats = _latest(context)
    if not mats:
        return None
    for m in mats:
        if (m.tags or {}).get("dagster/code_version") != version or _text(m.metadata, FINGERPRINT_KEY) != inputs \
                or _text(m.metadata, OUTPUT_KEY) != output:
            return None
    return dict(mats[0].metadata)


def stamped(metadata: dict, inputs: str, output: str, passed_over: bool = False) -> dict:
    """A materialization's metadata with its fingerprints; `passed_over`: it kept the table (the
    metadata is then the earlier materialization's)."""
    return {**metadata, FINGERPRINT_KEY: dg.MetadataValue.text(inputs), OUTPUT_KEY: dg.MetadataValue.text(output),
            "passed_over": dg.MetadataValue.bool(passed_over)}


# what the stages after scoring read, over every teacher (rankings and curation)
SCORED = (Stamp("response_scores"), Stamp("step_scores", "response_id, step_index, score_run_id"),
          Stamp("reasoning_steps", "response_id, step_index, steps_run_id"),
          Stamp("raw_teacher_traces", "response_id, ingest_run_id, is_correct"))
