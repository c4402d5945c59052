"""Teacher-trace adapters: input files -> canonical trace rows + a quarantine, losing nothing.

Pure logic (no Dagster). Every row read ends up in exactly one of ``IngestResult.traces``
(columns ``TRACE_COLUMNS``) or ``IngestResult.quarantine`` (columns ``QUARANTINE_COLUMNS``,
with a short ``reason`` code and a human ``detail``), so ``n_read == traces.height +
quarantine.height`` always holds. Neither a bad row nor a bad file raises: a file that cannot
be read, decoded or detected is one quarantine row (``source_row`` null). Only configuration
mistakes raise: a missing source path (FileNotFoundError), an unknown format, teacher mode or
CHAMP setting (:class:`ConfigError`, a ValueError).

Layout, one unit per module:

* :mod:`.common`: schemas, reason codes, :class:`Limits`, the per-file collector, ids.
* readers, one per format, each ``reader(path, ctx) -> IngestResult``:
  :mod:`.canonical` (rows with ``prompt_id, prompt, teacher, response``),
  :mod:`.messages` (chat transcripts), :mod:`.sharegpt` (ShareGPT ``conversations``),
  :mod:`.alpaca` (``instruction`` / ``input`` / ``output``), :mod:`.zeroeval` (one JSON list
  per model), :mod:`.champ` (the CHAMP dataset of the ``champ-dataset`` package).
* :mod:`.rows`: the containers the row formats are read from (JSONL, a JSON list, Parquet,
  Arrow); :mod:`.hf`: Hugging Face dataset layouts (``save_to_disk`` folders, hub downloads).
* transforms: :mod:`.json_output` (a ZeroEval output -> reasoning, answer), :mod:`.dedupe`.
* :mod:`.registry`: format name -> reader, detection, source expansion, file hashes.
* :mod:`.api`: ``read_one`` (one file), ``finish`` (across files), ``ingest``,
  ``discover_teachers``.

Source rows are numbered 1-based by physical line for JSONL and 0-based by position for JSON
lists, Parquet, Arrow and CHAMP conversations.
"""

from __future__ import annotations

from lalp_resources.adapters.alpaca import read_alpaca
from lalp_resources.adapters.api import discover_teachers, finish, ingest, read_one
from lalp_resources.adapters.champ import CHAMP_ZERO_SHOT, champ_path, read_champ
from lalp_resources.adapters.common import (
    QUARANTINE_COLUMNS,
    QUARANTINE_SCHEMA,
    REASONS,
    TRACE_COLUMNS,
    TRACE_SCHEMA,
    ConfigError,
    IngestResult,
    Limits,
    ReadContext,
    response_id,
)
from lalp_resources.adapters.canonical import read_canonical
from lalp_resources.adapters.dedupe import dedupe
from lalp_resources.adapters.json_output import parse_json_output
from lalp_resources.adapters.messages import read_messages
from lalp_resources.adapters.sharegpt import read_sharegpt
from lalp_resources.adapters.registry import FORMATS, READERS, detect_format, expand_sources, file_sha256
from lalp_resources.adapters.zeroeval import read_zeroeval

__all__ = [
    "TRACE_COLUMNS",
    "TRACE_SCHEMA",
    "QUARANTINE_COLUMNS",
    "QUARANTINE_SCHEMA",
    "REASONS",
    "FORMATS",
    "READERS",
    "CHAMP_ZERO_SHOT",
    "ConfigError",
    "IngestResult",
    "Limits",
    "ReadContext",
    "expand_sources",
    "file_sha256",
    "read_one",
    "finish",
    "ingest",
    "discover_teachers",
    "detect_format",
    "dedupe",
    "response_id",
    "parse_json_output",
    "read_canonical",
    "read_messages",
    "read_sharegpt",
    "read_alpaca",
    "read_zeroeval",
    "read_champ",
    "champ_path",
]
