"""Ingestion, one file at a time: ``read_one`` per item, then ``finish`` across them.

``ingest(sources) == finish([read_one(item) for item in expand_sources(sources)])``. The
pipeline calls ``read_one`` once per changed file (keyed by :func:`file_sha256`) and
``finish`` over the parts it keeps.
"""

from __future__ import annotations

import stat
import traceback
from pathlib import Path

import polars as pl

from lalp_resources import objectstore
from lalp_resources.adapters.champ import TEACHER_MODES, champ_uri, is_champ_spec
from lalp_resources.adapters.common import (
    QUARANTINE_SCHEMA,
    TRACE_COLUMNS,
    TRACE_SCHEMA,
    Collector,
    ConfigError,
    IngestResult,
    Limits,
    ReadContext,
    file_uri,
    frame,
    sha256_file,
)
from lalp_resources.adapters.dedupe import dedupe
from lalp_resources.adapters.registry import READERS, detect_format, expand_sources, item_path
from lalp_resources.method.answers import annotate


def _check_options(fmt: str, teacher_mode: str, limits: Limits) -> None:
    """Configuration mistakes raise ConfigError / TypeError; data problems never do."""
    if fmt != "auto" and fmt not in READERS:
        raise ConfigError(f"unknown format {fmt!r}; use one of {tuple(READERS)} or 'auto'")
    if teacher_mode not in TEACHER_MODES:
        raise ConfigError(f"unknown teacher_mode {teacher_mode!r}; use 'model' or 'model+setting'")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be an adapters.Limits, got {type(limits).__name__}")


def _not_a_readable_file(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a regular file, or None. Never opens it: a FIFO or a
    device could block forever."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "no such file"
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _whole_file_failure(uri: str, path: Path, fmt: str | None, reason: str, detail: str, limits: Limits) -> IngestResult:
    sha = None
    if _not_a_readable_file(path) is None:
        try:
            sha = sha256_file(path)
        except OSError:
            pass
    col = Collector(uri, sha, fmt, "row", limits)
    col.fail_file(reason, detail, teacher=None)
    return col.result()


def read_one(item: str | Path, fmt: str = "auto", *, teacher_mode: str, limits: Limits,
             champ_settings: tuple[str, ...] | None = None, local: Path | None = None) -> IngestResult:
    """One item of :func:`expand_sources` (a file, or the CHAMP spec) -> its rows, deduplicated
    within the file; answers are not verified yet (:func:`finish` does that).

    Never raises for a data problem. A file that cannot be read (``unreadable_file``: gone,
    not a regular file, no permission, I/O error), whose format cannot be detected
    (``unknown_format``) or that a reader cannot open (``invalid_parquet``, ``invalid_json``,
    ...) is one quarantine row with a null ``source_row``: one row read, one quarantined.
    Raises ConfigError (a ValueError) only for configuration mistakes: an unknown ``fmt`` or
    ``teacher_mode``, an unknown CHAMP setting, the CHAMP spec without its package. Any other
    exception inside a reader (a bug) becomes one ``reader_error`` row naming it.

    An object (``s3://...``) is read from a local copy: ``local`` when the caller has downloaded
    it already (:func:`lalp_resources.objectstore.local_copy`), else one made here; its rows carry
    the object's URL as ``source_uri``. An object that cannot be downloaded is one
    ``unreadable_file`` row, as a file that cannot be opened is.
    """
    _check_options(fmt, teacher_mode, limits)
    if objectstore.is_remote(item):
        return _read_object(str(item), fmt, teacher_mode, limits, champ_settings, local)
    champ = is_champ_spec(item)
    if champ and fmt not in ("auto", "champ"):
        raise ConfigError(f"source {item!r} is the CHAMP dataset; its format is 'champ', not {fmt!r}")
    path = item_path(item)
    try:
        uri = champ_uri(path) if champ else file_uri(path)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        uri = path.absolute().as_uri()
    ctx = ReadContext(limits=limits, teacher_mode=teacher_mode, champ_settings=champ_settings)
    return _read_file(path, uri, str(path), item if champ else path, fmt, ctx)


def _read_file(path: Path, uri: str, name: str, detect_as, fmt: str, ctx: ReadContext) -> IngestResult:
    """`read_one` of a local file `path` whose rows are labelled `uri` and which messages call `name`."""
    limits = ctx.limits
    label = None if fmt == "auto" else fmt  # the format column stays null until one is known
    problem = _not_a_readable_file(path)
    if problem:
        return _whole_file_failure(uri, path, label, "unreadable_file", f"cannot read {name}: {problem}", limits)
    if fmt == "auto":
        try:
            fmt = detect_format(detect_as)
        except OSError as exc:
            return _whole_file_failure(uri, path, label, "unreadable_file", f"cannot read {name}: {exc}", limits)
        except ValueError as exc:
            return _whole_file_failure(uri, path, label, "unknown_format", str(exc).replace(str(path), name), limits)
    try:
        res = READERS[fmt](path, ctx)
    except OSError as exc:
        return _whole_file_failure(uri, path, fmt, "unreadable_file", f"cannot read {name}: {exc}", limits)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reader bug must not stop the other files
        return _reader_error(uri, path, fmt, exc, limits)
    kept, dups = dedupe(res.traces)
    return IngestResult(kept, pl.concat([res.quarantine, dups]), res.n_read)


def _read_object(url: str, fmt: str, teacher_mode: str, limits: Limits, champ_settings, local: Path | None) -> IngestResult:
    if fmt == "champ":
        raise ConfigError(f"source {url!r} is an object; the 'champ' format reads the packaged CHAMP dataset only")
    if local is None:
        try:
            with objectstore.local_copy(url) as (copy, _):
                return _read_object(url, fmt, teacher_mode, limits, champ_settings, copy)
        except ConfigError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:  # gone, no permission, the store unreachable
            col = Collector(url, None, None if fmt == "auto" else fmt, "row", limits)
            col.fail_file("unreadable_file", f"cannot read {url}: {type(exc).__name__}: {str(exc)[:300]}")
            return col.result()
    ctx = ReadContext(limits=limits, teacher_mode=teacher_mode, champ_settings=champ_settings, source_uri=url, origin=url)
    return _read_file(Path(local), url, url, Path(local), fmt, ctx)


def _reader_error(uri: str, path: Path, fmt: str, exc: Exception, limits: Limits) -> IngestResult:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return _whole_file_failure(uri, path, fmt, "reader_error",
                               f"the {fmt} reader failed{at}: {type(exc).__name__}: {str(exc)[:200]}", limits)


def finish(parts: list[IngestResult], *, verify: bool = True) -> IngestResult:
    """Concatenate per-file results, dedupe across them (the first file in ``parts`` order
    wins; each later copy is quarantined as ``duplicate`` / ``conflicting_duplicate`` with the
    row it repeats), verify answers (:func:`lalp_resources.method.answers.annotate`; with
    ``verify=False`` the ``is_correct`` / ``verify_reason`` columns stay null) and check that
    the counts reconcile."""
    traces = pl.concat([p.traces for p in parts]) if parts else frame([], TRACE_SCHEMA)
    quarantine = pl.concat([p.quarantine for p in parts]) if parts else frame([], QUARANTINE_SCHEMA)
    n_read = sum(p.n_read for p in parts)
    kept, dups = dedupe(traces)
    if verify and kept.height:
        kept = annotate(kept).select(TRACE_COLUMNS)
    result = IngestResult(kept, pl.concat([quarantine, dups]), n_read)
    if result.n_read != result.traces.height + result.quarantine.height:
        raise AssertionError(f"ingest lost rows: read {result.n_read}, accepted {result.traces.height}, "
                             f"quarantined {result.quarantine.height}")
    return result


def ingest(sources: list[str | Path] | str | Path, fmt: str = "auto", *, teacher_mode: str, limits: Limits,
           champ_settings: tuple[str, ...] | None = None, verify: bool = True) -> IngestResult:
    """Read every source (files, folders, the CHAMP spec), dedupe across all, verify, reconcile.

    Raises FileNotFoundError for a source path that does not exist and ValueError for other
    configuration mistakes (see :func:`read_one`); a bad file or row is quarantined instead.
    """
    _check_options(fmt, teacher_mode, limits)
    parts = [read_one(item, fmt, teacher_mode=teacher_mode, limits=limits, champ_settings=champ_settings)
             for item in expand_sources(sources)]
    return finish(parts, verify=verify)


def discover_teachers(sources: list[str | Path] | str | Path, fmt: str = "auto", *, teacher_mode: str,
                      limits: Limits, champ_settings: tuple[str, ...] | None = None) -> list[str]:
    """Sorted distinct teachers with at least one accepted trace (answers are not verified).

    One source file at a time, so memory is one file's, not every file's: deduplicating never
    takes a teacher away (the first copy of a row stays accepted), so it is not needed here."""
    _check_options(fmt, teacher_mode, limits)
    teachers: set[str] = set()
    for item in expand_sources(sources):
        part = read_one(item, fmt, teacher_mode=teacher_mode, limits=limits, champ_settings=champ_settings)
        teachers.update(part.traces.get_column("teacher").unique().to_list())
    return sorted(teachers)
