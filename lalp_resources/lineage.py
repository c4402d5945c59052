"""Row-level lineage: from a response (curated or not) back to its steps, scores, teacher, input
file and the Dagster runs that ingested, segmented, scored and selected it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from lalp_resources.diagnostics import shorten
from lalp_resources.warehouse import Warehouse, query


def _file_sha256(uri: str) -> str | None:
    """Current hash of a local input file (or object), to show whether it still matches what was ingested."""
    from lalp_resources import objectstore

    if objectstore.is_remote(uri):
        try:
            return objectstore.sha256(uri)
        except (OSError, RuntimeError, ValueError):
            return None
    if not uri.startswith("file://"):
        return None
    path = Path(unquote(urlparse(uri).path))
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_info(run_id: str | None) -> dict | None:
    if not run_id:
        return None
    try:
        import dagster as dg

        inst = dg.DagsterInstance.get()
        run = inst.get_run_by_id(run_id)
        if run is None:
            return {"run_id": run_id, "status": "not in this Dagster instance"}
        rec = inst.get_run_record_by_id(run_id)
        return {
            "run_id": run_id, "job": run.job_name, "status": run.status.value,
            "partition_range": [run.tags.get("dagster/asset_partition_range_start"), run.tags.get("dagster/asset_partition_range_end")]
            if "dagster/asset_partition_range_start" in run.tags else run.tags.get("dagster/partition"),
            "started": rec.start_time if rec else None,
        }
    except Exception as e:  # lineage still answers from the warehouse without the instance
        return {"run_id": run_id, "status": f"unavailable ({type(e).__name__}: {e})"}


def lineage_report(response_id: str, warehouse_path: str) -> dict | None:
    wh = Warehouse(warehouse_path)
    with wh.connect(read_only=True) as con:  # a read-only command never creates a warehouse
        raw = query(con, "SELECT * EXCLUDE (response) FROM raw_teacher_traces WHERE response_id = ?", [response_id])
        if raw.height == 0:
            return None
        curated = query(con, "SELECT * EXCLUDE (prompt, response, messages) FROM curated_sft_dataset WHERE response_id = ?", [response_id])
        decision = query(con, "SELECT * FROM selection_decisions WHERE response_id = ?", [response_id])
        resp = query(con, "SELECT * FROM response_scores WHERE response_id = ?", [response_id])
        steps = query(
            con,
            "SELECT s.step_index, s.char_start, s.char_end, s.text, s.steps_run_id, s.segmenter_version, "
            "sc.n_tokens, sc.mean_logprob, sc.cache_hit, sc.score_run_id "
            "FROM reasoning_steps s LEFT JOIN step_scores sc USING (response_id, step_index) "
            "WHERE s.response_id = ? ORDER BY s.step_index",
            [response_id],
        )
    r = raw.row(0, named=True)
    current = _file_sha256(r["source_uri"])
    report = {
        "response_id": response_id,
        "teacher": r["teacher"],
        "prompt_id": r["prompt_id"],
        "curated": curated.height > 0,
        "selection": decision.row(0, named=True) if decision.height else None,
        "input": {
            "source_uri": r["source_uri"], "source_sha256": r["source_sha256"], "source_row": r["source_row"],
            "format": r["format"], "file_sha256_now": current,
            "file_unchanged": None if current is None else current == r["source_sha256"],
        },
        "answer": {"final_answer": r["final_answer"], "reference_answer": r["reference_answer"],
                   "is_correct": r["is_correct"], "verify_reason": r["verify_reason"]},
        "scores": resp.row(0, named=True) if resp.height else None,
        "weakest": _weakest(resp, steps),
        "steps": steps.drop("text").to_dicts(),
        "runs": {},
    }
    run_ids = {
        "ingest": r["ingest_run_id"],
        "segment": steps["steps_run_id"][0] if steps.height else None,
        "score": resp["score_run_id"][0] if resp.height else None,
        "select": curated["select_run_id"][0] if curated.height else (decision["select_run_id"][0] if decision.height else None),
    }
    report["runs"] = {k: _run_info(v) for k, v in run_ids.items()}
    return report


def _weakest(resp, steps) -> dict | None:
    """The response's lowest-scored step (from `response_scores`) with its text."""
    if resp.height == 0 or "weakest_step" not in resp.columns or resp["weakest_step"][0] is None:
        return None
    s = resp.row(0, named=True)
    text = steps.filter(steps["step_index"] == s["weakest_step"])["text"]
    return {"step_index": s["weakest_step"], "char_start": s["weakest_char_start"], "char_end": s["weakest_char_end"],
            "score": s["weakest_score"], "gap": s["weakest_gap"], "text": text[0] if text.len() else None}


def format_report(r: dict) -> str:
    lines = [f"response {r['response_id']}  teacher={r['teacher']}  prompt_id={r['prompt_id']}"]
    sel = r["selection"]
    if r["curated"]:
        lines.append(f"  curated: YES ({sel['reason'] if sel else ''})")
    else:
        lines.append(f"  curated: no ({sel['reason'] if sel else 'not considered yet'})")
    i = r["input"]
    lines.append(f"  input: {i['source_uri']} row {i['source_row']} ({i['format']})")
    lines.append(f"         sha256 {i['source_sha256']}" + (
        "" if i["file_unchanged"] is None else ("  (file unchanged)" if i["file_unchanged"] else "  (FILE CHANGED since ingest)")))
    a = r["answer"]
    lines.append(f"  answer: {a['final_answer']!r} vs reference {a['reference_answer']!r}: {a['verify_reason']}")
    s = r["scores"]
    if s:
        lines.append(f"  scores: LALP={s['lalp']:.4f} GALP={s['galp']:.4f} over {s['n_steps']} steps; student={s['student']} "
                     f"window={s['window_spec']} template={s['template']} dtype={s['dtype']} segmenter={s['segmenter_version']}")
    w = r.get("weakest")
    if w:
        lines.append(f"  weakest step: {w['step_index']} chars [{w['char_start']}, {w['char_end']}) mean_logprob={w['score']:.4f}, "
                     f"{w['gap']:.4f} below the response's mean: {shorten(w['text'], 100)!r}")
    for st in r["steps"]:
        mean = st["mean_logprob"]
        lines.append(f"    step {st['step_index']:>3} chars [{st['char_start']}, {st['char_end']}) tokens={st['n_tokens']} "
                     f"mean_logprob={'n/a' if mean is None else f'{mean:.4f}'}{' (cache)' if st['cache_hit'] else ''}")
    for stage, info in r["runs"].items():
        if info:
            lines.append(f"  {stage} run: {info['run_id']} {info.get('job', '')} {info['status']}")
    return "\n".join(lines)
