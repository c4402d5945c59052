"""Tests for lalp_resources.adapters: every input row is accepted or quarantined, never lost.

Unit tests build small files in tmp_path. The zeroeval data test reads
../shared/data/zeroeval-math-l5 (skips when absent); the CHAMP tests read the file
shipped inside the installed champ-dataset package.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lalp_resources import adapters
from lalp_resources.adapters import (
    QUARANTINE_COLUMNS,
    REASONS,
    TRACE_COLUMNS,
    dedupe,
    detect_format,
    discover_teachers,
    ingest,
    parse_json_output,
    read_source,
    response_id,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
ZEROEVAL_DIR = DATA_DIR / "zeroeval-math-l5"


# --------------------------------------------------------------------------- helpers


def row(pid="p1", teacher="t1", prompt="What is 1+1?", response="1+1 = \\boxed{2}", **extra) -> dict:
    return {"prompt_id": pid, "prompt": prompt, "teacher": teacher, "response": response, **extra}


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts are dumped, str encoded, bytes written as is."""
    out = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode("utf-8")
        out.append(line)
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


def reasons_by_row(res) -> dict[int, str]:
    return dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["reason"].to_list()))


def check_invariants(res) -> None:
    """What must hold for any input: schemas, reconciliation, known reasons."""
    assert res.traces.columns == TRACE_COLUMNS
    assert res.quarantine.columns == QUARANTINE_COLUMNS
    assert res.traces.schema["source_row"] == pl.Int64
    assert res.traces.schema["is_correct"] == pl.Boolean
    assert res.n_read == res.traces.height + res.quarantine.height
    assert set(res.quarantine["reason"].to_list()) <= set(REASONS)
    assert res.quarantine["detail"].null_count() == 0
    s = res.summary()
    assert s["read"] == res.n_read and s["accepted"] + s["quarantined"] == s["read"]
    assert sum(s["by_reason"].values()) == s["quarantined"]
    # No two accepted rows share (prompt_id, teacher).
    assert res.traces.select("prompt_id", "teacher").is_duplicated().sum() == 0


# --------------------------------------------------------------------------- canonical JSONL


def test_canonical_jsonl_good_and_every_bad_row_kind(tmp_path):
    path = write_lines(
        tmp_path / "traces.jsonl",
        [
            row("p1", response="first answer \\boxed{2}", reference_answer="2"),  # 1 ok
            row(2, response="int prompt id", reference_answer=7),  # 2 ok, prompt_id cast
            "   ",  # 3 blank: ignored, not counted
            '{"prompt_id": "p3", "prompt": ',  # 4 invalid JSON
            {"prompt_id": "p4", "prompt": "q", "response": "r"},  # 5 missing teacher
            row("p5", response="  \n\t "),  # 6 whitespace-only response
            b'{"prompt_id": "p6", "teacher": "t1", "prompt": "q", "response": "\xff\xfe"}',  # 7 bad UTF-8
            row("p1", response="a different answer"),  # 8 conflicting duplicate of line 1
            row(2, response="int prompt id", reference_answer=7),  # 9 exact duplicate of line 2
            row("p9", response="x" * 1001),  # 10 too large (limit 1000 below)
            row("p10", response=["not", "a", "string"]),  # 11 invalid type
            row("p11", prompt=""),  # 12 empty prompt
            "[1, 2, 3]",  # 13 JSON but not an object
            '{"prompt_id": "p13", "teacher": "t1", "prompt": "q", "response": "\\ud800"}',  # 14 lone surrogate
            row("p14", teacher="t2", final_answer="given"),  # 15 ok, final_answer given
        ],
    )
    res = read_source(path, max_response_chars=1000)
    check_invariants(res)
    assert res.n_read == 14  # 15 lines minus the blank one
    assert sorted(res.traces["prompt_id"].to_list()) == ["2", "p1", "p14"]
    assert reasons_by_row(res) == {
        4: "invalid_json",
        5: "missing_field",
        6: "empty_response",
        7: "undecodable_bytes",
        8: "conflicting_duplicate",
        9: "duplicate",
        10: "too_large",
        11: "invalid_type",
        12: "empty_prompt",
        13: "invalid_type",
        14: "undecodable_bytes",
    }
    q = {r["source_row"]: r for r in res.quarantine.iter_rows(named=True)}
    assert q[5]["detail"] == "line 5: missing field 'teacher'"
    assert q[5]["prompt_id"] == "p4" and q[5]["teacher"] is None
    assert q[7]["detail"].startswith("line 7: not valid UTF-8")
    assert "\ufffd" in q[7]["raw_excerpt"]  # decoded with errors='replace'
    assert "line 1" not in q[8]["detail"] and "row 1" in q[8]["detail"]  # names the kept row
    assert path.resolve().as_uri() in q[8]["detail"]
    assert q[10]["detail"].startswith("line 10:") and "1001" in q[10]["detail"]
    assert len(q[10]["raw_excerpt"]) == 300

    uri, sha = path.resolve().as_uri(), hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(res.traces["source_uri"]) == {uri} and set(res.quarantine["source_uri"]) == {uri}
    assert set(res.traces["source_sha256"]) == {sha}
    t = {r["prompt_id"]: r for r in res.traces.iter_rows(named=True)}
    assert t["p1"]["source_row"] == 1 and t["2"]["source_row"] == 2 and t["p14"]["source_row"] == 15
    assert t["p1"]["response_id"] == response_id("p1", "t1", "What is 1+1?", "first answer \\boxed{2}")
    assert t["2"]["reference_answer"] == "7"
    assert t["p1"]["format"] == "canonical"
    # answers.annotate ran: extracted answer verified against the reference.
    assert t["p1"]["final_answer"] == "2" and t["p1"]["is_correct"] is True
    assert t["p1"]["verify_reason"] == "verified"
    assert t["p14"]["final_answer"] == "given" and t["p14"]["verify_reason"] == "no_reference"


def test_blank_lines_are_not_counted_and_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row()).encode() + b"\n\n\r\n  \n")
    res = read_source(path, verify=False)
    check_invariants(res)
    assert (res.n_read, res.traces.height) == (1, 1)


# --------------------------------------------------------------------------- canonical Parquet


def test_canonical_parquet(tmp_path):
    table = pa.table(
        {
            "prompt_id": pa.array([1, 2, 3, 4, 1, 2, 7], pa.int64()),
            "prompt": ["q1", "q2", "q3", "q4", "q1", "q2", "q7"],
            "teacher": ["t", "t", None, "t", "t", "t", "t"],
            "response": ["r1", "r2", "r3", "   ", "r1 again", "r2", "y" * 50],
            "reference_answer": [None, "2", "3", None, None, "2", None],
        }
    )
    path = tmp_path / "traces.parquet"
    pq.write_table(table, path)
    res = read_source(path, max_response_chars=40, verify=False)
    check_invariants(res)
    assert res.n_read == 7
    assert sorted(res.traces["prompt_id"].to_list()) == ["1", "2"]
    assert res.traces["source_row"].to_list() == [0, 1]  # 0-based
    assert reasons_by_row(res) == {
        2: "missing_field",
        3: "empty_response",
        4: "conflicting_duplicate",
        5: "duplicate",
        6: "too_large",
    }
    det = dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["detail"].to_list()))
    assert det[2] == "row 2: missing field 'teacher'"
    assert det[4].startswith("row 4:") and "row 0" in det[4]


def test_parquet_missing_column_quarantines_every_row(tmp_path):
    path = tmp_path / "no_teacher.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["q", "q"], "response": ["r", "r"]}), path)
    res = read_source(path, verify=False)
    check_invariants(res)
    assert res.traces.height == 0 and res.quarantine["reason"].to_list() == ["missing_field"] * 2


def test_corrupt_parquet_is_a_whole_source_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read Parquet"):
        read_source(path)


# --------------------------------------------------------------------------- messages


def test_messages_openai_and_sharegpt(tmp_path):
    path = write_lines(
        tmp_path / "chats.jsonl",
        [
            {  # 1 OpenAI style, multi-turn: prompt = last user turn before the final assistant
                "prompt_id": "m1",
                "teacher": "qwen",
                "reference_answer": "4",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "warm-up"},
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "<think>2+2</think>The answer is \\boxed{4}"},
                ],
            },
            {  # 2 ShareGPT style, 'model' key, no prompt_id -> hash of the prompt
                "model": "llama",
                "messages": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}],
            },
            {  # 3 multi-part content
                "teacher": "gpt",
                "prompt_id": 3,
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "part A "}, {"type": "text", "text": "B"}]},
                    {"role": "assistant", "content": "done"},
                ],
            },
            {"teacher": "x", "messages": [{"role": "user", "content": "no reply"}]},  # 4 no assistant
            {"teacher": "x", "messages": "not a list"},  # 5 invalid type
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # 6 no teacher
            "{broken",  # 7 invalid JSON
            b'{"teacher": "x", "messages": [], "junk": "\xc3\x28"}',  # 8 undecodable
            {"teacher": "x", "messages": [{"role": "assistant", "content": "a"}]},  # 9 no user turn
            {"teacher": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # 10
        ],
    )
    assert detect_format(path) == "messages"
    res = read_source(path)
    check_invariants(res)
    assert res.n_read == 10
    t = {r["teacher"]: r for r in res.traces.iter_rows(named=True)}
    assert set(t) == {"qwen", "llama", "gpt"}
    assert t["qwen"]["prompt"] == "What is 2+2?"
    assert t["qwen"]["response"] == "<think>2+2</think>The answer is \\boxed{4}"  # think block kept
    assert t["qwen"]["is_correct"] is True
    assert t["llama"]["prompt"] == "Say hi" and t["llama"]["response"] == "hi"
    assert t["llama"]["prompt_id"] == hashlib.sha256(b"Say hi").hexdigest()[:16]
    assert t["gpt"]["prompt"] == "part A B" and t["gpt"]["prompt_id"] == "3"
    assert set(res.traces["format"]) == {"messages"}
    assert reasons_by_row(res) == {
        4: "missing_field",
        5: "invalid_type",
        6: "missing_field",
        7: "invalid_json",
        8: "undecodable_bytes",
        9: "missing_field",
        10: "empty_response",
    }


# --------------------------------------------------------------------------- zeroeval


def fenced(reasoning: str, answer: str) -> str:
    return "```json\n" + json.dumps({"reasoning": reasoning, "answer": answer}, indent=4) + "\n```"


def zrec(i, output, problem="Compute.", answer="1", **extra) -> dict:
    return {"session_id": i, "id": i, "problem": problem, "answer": answer, "generator": "org/m",
            "output": output if isinstance(output, list) else [output], **extra}


def test_zeroeval_file(tmp_path):
    latex_raw = '```json\n{\n  "reasoning": "We get $\\frac{1}{2}$ and $\\sqrt{4}=2$.\nSo half.",\n  "answer": "\\frac{1}{2}"\n}\n```'
    records = [
        zrec(0, fenced("Because 1.", "1")),  # ok
        zrec(1, '{"reasoning": "no fences here", "answer": "1"}'),  # ok, unfenced
        zrec(2, latex_raw, answer="0.5"),  # ok after escape repair (raw \frac, \sqrt, raw newline)
        zrec(3, '{"reasoning": "lost the opening fence", "answer": "2"}\n```', answer="3"),  # ok
        zrec(4, '```json\n{\n "reasoning": "unterminated\n\n"answer": "5"\n}\n```', answer="5"),  # ok via regex
        zrec(5, '```json\n{\n  "reasoning": "went on and on and on'),  # truncated
        zrec(6, ""),  # empty output
        zrec(7, []),  # empty output list
        zrec(8, fenced("", "1")),  # empty reasoning
        zrec(9, "The answer is 42."),  # no JSON at all
        {"id": 10, "answer": "1", "output": [fenced("r", "1")]},  # missing problem
        [1, 2],  # not an object
        zrec(0, fenced("A different solution.", "1")),  # conflicting duplicate of record 0
        zrec(13, [7]),  # output[0] not a string
    ]
    d = tmp_path / "runs"
    d.mkdir()
    path = d / "gpt-4o-2024-08-06.json"
    path.write_text(json.dumps(records))
    (d / "summary.json").write_text(json.dumps([{"Model": "gpt-4o-2024-08-06", "Acc": "1"}]))
    assert detect_format(path) == "zeroeval"

    res = read_source(d)  # a directory: summary.json is skipped
    check_invariants(res)
    assert res.n_read == len(records)
    assert set(res.traces["teacher"]) == {"gpt-4o-2024-08-06"}
    assert set(res.quarantine["teacher"]) == {"gpt-4o-2024-08-06"}
    t = {r["prompt_id"]: r for r in res.traces.iter_rows(named=True)}
    assert sorted(t) == ["0", "1", "2", "3", "4"]
    assert t["0"]["response"] == "Because 1." and t["0"]["final_answer"] == "1" and t["0"]["is_correct"] is True
    assert t["0"]["prompt"] == "Compute." and t["0"]["reference_answer"] == "1"
    assert t["2"]["response"] == "We get $\\frac{1}{2}$ and $\\sqrt{4}=2$.\nSo half."  # not a form feed
    assert t["2"]["final_answer"] == "\\frac{1}{2}" and t["2"]["is_correct"] is True
    assert t["3"]["is_correct"] is False and t["3"]["verify_reason"] == "mismatch"
    assert t["4"]["response"].startswith("unterminated") and t["4"]["final_answer"] == "5"
    assert [t[k]["source_row"] for k in sorted(t)] == [0, 1, 2, 3, 4]
    assert reasons_by_row(res) == {
        5: "unparsable_output",
        6: "unparsable_output",
        7: "unparsable_output",
        8: "unparsable_output",
        9: "unparsable_output",
        10: "missing_field",
        11: "invalid_type",
        12: "conflicting_duplicate",
        13: "invalid_type",
    }
    det = dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["detail"].to_list()))
    assert det[5].startswith("record 5: truncated output")
    assert det[10] == "record 10: missing field 'problem'"


@pytest.mark.parametrize(
    "content, reason",
    [(b"[{\"id\": 1, ", "invalid_json"), (b"\xff\xfe[]", "undecodable_bytes"), (b'{"a": 1}', "invalid_type")],
)
def test_zeroeval_whole_file_problem_is_one_quarantine_row(tmp_path, content, reason):
    path = tmp_path / "m.json"
    path.write_bytes(content)
    res = read_source(path, format="zeroeval")
    check_invariants(res)
    assert res.n_read == 1 and res.quarantine["reason"].to_list() == [reason]
    assert res.quarantine["source_row"].to_list() == [None]
    assert res.quarantine["detail"][0].startswith("whole file:")


def test_parse_json_output_repairs():
    assert parse_json_output('```json\n{"reasoning": "a", "answer": 3}\n```') == ("a", "3")
    # LaTeX commands that collide with JSON escapes stay LaTeX; real \n stays a newline.
    r, a = parse_json_output('{"reasoning": "$\\frac{a}{b}\\times\\beta$\\nnext", "answer": "\\boxed{1}"}')
    assert r == "$\\frac{a}{b}\\times\\beta$\nnext" and a == "\\boxed{1}"
    # Correctly escaped JSON is untouched.
    r, _ = parse_json_output(json.dumps({"reasoning": "\\frac{1}{2}\n\ttab", "answer": "x"}))
    assert r == "\\frac{1}{2}\n\ttab"
    for bad in ["", "   ", "no json", '{"reasoning": "cut', '{"answer": "1"}', '[1, 2]']:
        with pytest.raises(ValueError):
            parse_json_output(bad)


# --------------------------------------------------------------------------- across sources


def test_ingest_dedupes_across_sources(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row("p1"), row("p2")])
    b = write_lines(tmp_path / "b.jsonl", [row("p1"), row("p2", response="changed"), row("p3")])
    res = ingest([a, b], verify=False)
    check_invariants(res)
    assert res.n_read == 5 and res.traces.height == 3
    q = res.quarantine.sort("source_row")
    assert q["reason"].to_list() == ["duplicate", "conflicting_duplicate"]
    assert all(a.resolve().as_uri() in d for d in q["detail"])
    assert set(q["source_uri"]) == {b.resolve().as_uri()}
    # Reading the same file twice: every row of the second copy is a duplicate.
    res2 = ingest([a, a], verify=False)
    assert res2.summary() == {"read": 4, "accepted": 2, "quarantined": 2, "by_reason": {"duplicate": 2}}


def test_dedupe_keeps_first_and_reports_the_kept_row():
    mk = lambda pid, resp, r: {c: None for c in TRACE_COLUMNS} | {  # noqa: E731
        "prompt_id": pid, "teacher": "t", "prompt": "q", "response": resp,
        "source_uri": "file:///x.jsonl", "source_row": r, "format": "canonical"}
    df = pl.DataFrame([mk("a", "r1", 1), mk("a", "r2", 2), mk("a", "r2", 3), mk("b", "r1", 4)],
                      schema=adapters.TRACE_SCHEMA)
    kept, bad = dedupe(df)
    assert kept["source_row"].to_list() == [1, 4]
    assert bad["reason"].to_list() == ["conflicting_duplicate", "duplicate"]
    # Row 3 repeats row 2 exactly (itself quarantined): a duplicate, pointing at row 2.
    assert bad["detail"].to_list()[1].startswith("line 3:") and "file:///x.jsonl row 2" in bad["detail"][1]
    assert "file:///x.jsonl row 1" in bad["detail"][0]
    assert bad.columns == QUARANTINE_COLUMNS


def test_response_id():
    rid = response_id("p", "t", "q", "r")
    assert rid == hashlib.sha256("p\x1ft\x1fq\x1fr".encode()).hexdigest()[:16]
    assert len(rid) == 16 and rid != response_id("p", "t", "q", "r2")


def test_discover_teachers(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row("p1", teacher="zeta"), row("p1", teacher="alpha"), "bad"])
    assert discover_teachers([a]) == ["alpha", "zeta"]


def test_detection_and_whole_source_errors(tmp_path):
    canon = write_lines(tmp_path / "c.jsonl", ["garbage first", row()])
    assert detect_format(canon) == "canonical"
    jsonl_in_json = write_lines(tmp_path / "c.json", [row()])
    assert detect_format(jsonl_in_json) == "canonical"
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot detect"):
        read_source(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not found"):
        read_source(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        read_source(canon, format="csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.json"):
        read_source(tmp_path / "empty")
    (tmp_path / "obj.json").write_text('{"not": "a known layout"}')
    with pytest.raises(ValueError, match="cannot detect"):
        read_source(tmp_path / "obj.json")


# --------------------------------------------------------------------------- property tests

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)
# Field values: anything JSON, plain or blank strings, and strings over the size limit.
field_values = st.one_of(json_values, st.sampled_from(["", "  ", "ok", "é∑漢🙂"]), st.text(min_size=0, max_size=30),
                         st.text(alphabet="ab\\{}$", min_size=590, max_size=700))
FIELDS = ["prompt_id", "prompt", "teacher", "response", "reference_answer", "final_answer", "model"]


def message_lists():
    turn = st.one_of(
        json_values,
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt"]),
                               "content": field_values}),
        st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": field_values}),
    )
    return st.one_of(json_values, st.lists(turn, max_size=5))


hostile_dicts = st.fixed_dictionaries(
    {}, optional={**{f: field_values for f in FIELDS}, "messages": message_lists()}
)
good_dicts = st.builds(row, pid=st.one_of(st.integers(0, 5), st.sampled_from(["a", "b"])),
                       teacher=st.sampled_from(["t1", "t2"]), response=st.sampled_from(["r1", "r2", "x"]))
good_messages = st.builds(
    lambda pid, t, r: {"prompt_id": pid, "teacher": t,
                       "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": r}]},
    st.integers(0, 3), st.sampled_from(["t1", "t2"]), st.sampled_from(["r1", "r2"]))
SURROGATE_LINE = b'{"prompt_id": 1, "prompt": "p", "teacher": "t", "response": "\\udc80"}'

jsonl_lines = st.lists(
    st.one_of(
        st.binary(max_size=60),  # random bytes, may hold newlines and invalid UTF-8
        json_values.map(lambda v: json.dumps(v).encode()),
        hostile_dicts.map(lambda d: json.dumps(d, ensure_ascii=False).encode()),
        good_dicts.map(lambda d: json.dumps(d).encode()),
        good_messages.map(lambda d: json.dumps(d).encode()),
        st.just(SURROGATE_LINE),
        st.just(b""),
    ),
    max_size=25,
)

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expected_jsonl_rows(data: bytes) -> int:
    lines = data.split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for line in lines if line.strip())


@pytest.mark.parametrize("fmt", ["canonical", "messages"])
@PROPERTY
@given(lines=jsonl_lines)
def test_property_jsonl_adapters_never_raise_and_reconcile(fmt, lines):
    data = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostile.jsonl"
        path.write_bytes(data)
        res = read_source(path, format=fmt, max_response_chars=600, verify=False)
    check_invariants(res)
    assert res.n_read == expected_jsonl_rows(data)


def parquet_columns():
    """Columns of one random Arrow type each (a Parquet column cannot mix types)."""
    n = st.shared(st.integers(0, 12), key="nrows")
    kinds = {
        "string": (st.one_of(st.none(), field_values.filter(lambda v: isinstance(v, str))), pa.string()),
        "int": (st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), pa.int64()),
        "float": (st.one_of(st.none(), st.floats()), pa.float64()),
        "bool": (st.one_of(st.none(), st.booleans()), pa.bool_()),
        "binary": (st.one_of(st.none(), st.binary(max_size=10)), pa.binary()),
        "list": (st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3)), pa.list_(pa.string())),
    }

    def column(kind):
        values, typ = kinds[kind]
        return n.flatmap(lambda k: st.lists(values, min_size=k, max_size=k)).map(lambda v: pa.array(v, typ))

    col = st.sampled_from(sorted(kinds)).flatmap(column)
    return st.dictionaries(st.sampled_from(FIELDS[:6]), col, max_size=6).flatmap(
        lambda cols: n.map(lambda k: (cols, k)))


@PROPERTY
@given(spec=parquet_columns())
def test_property_parquet_never_raises_and_reconciles(spec):
    cols, nrows = spec
    table = pa.table(cols) if cols else pa.table({"unrelated": pa.array(range(nrows), pa.int64())})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostile.parquet"
        pq.write_table(table, path)
        res = read_source(path, max_response_chars=600, verify=False)
    check_invariants(res)
    assert res.n_read == table.num_rows


output_fragments = st.lists(
    st.one_of(
        st.sampled_from(["```json\n", "```", "{", "}", '"reasoning": "', '"answer": ', '"', ",", "\n",
                         "\\frac{1}{2}", "\\", "\\n", "\\u12", "$x$", "[", "]", '"42"', "null"]),
        st.text(max_size=15),
    ),
    max_size=20,
).map("".join)
zeroeval_records = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["id", "problem", "answer", "output"]),
                    st.one_of(field_values, st.lists(st.one_of(output_fragments, json_values), max_size=2)),
                    max_size=4),
    st.builds(lambda i, out, ans: {"id": i, "problem": "p", "answer": ans, "output": [out]},
              st.integers(0, 5), output_fragments, st.one_of(st.none(), st.text(max_size=5), st.integers())),
)


@PROPERTY
@given(records=st.lists(zeroeval_records, max_size=15), as_bytes=st.one_of(st.none(), st.binary(max_size=80)))
def test_property_zeroeval_never_raises_and_reconciles(records, as_bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "some-model.json"
        # Mostly a JSON list of hostile records; sometimes a whole file of random bytes.
        path.write_bytes(as_bytes if as_bytes is not None and len(as_bytes) % 3 == 0 else json.dumps(records).encode())
        res = read_source(path, format="zeroeval", max_response_chars=600, verify=False)
        whole_file = res.quarantine.filter(pl.col("source_row").is_null()).height
    check_invariants(res)
    assert res.n_read == (1 if whole_file else len(records))
    assert set(res.traces["teacher"]) <= {"some-model"}


@settings(max_examples=40, deadline=None)
@given(text=st.one_of(output_fragments, st.text(max_size=200)))
def test_property_parse_json_output_returns_or_raises_valueerror(text):
    try:
        r, a = parse_json_output(text)
    except ValueError:
        return
    assert isinstance(r, str) and r.strip() and (a is None or isinstance(a, str))


# --------------------------------------------------------------------------- CHAMP


def _champ_available() -> bool:
    try:
        adapters.champ_path()
        return True
    except ValueError:
        return False


champ = pytest.mark.skipif(not _champ_available(), reason="champ-dataset package not installed")


@champ
def test_champ_default_four_teachers_zero_shot():
    res = read_source("champ", verify=False)
    check_invariants(res)
    s = res.summary()
    assert s == {"read": 1080, "accepted": 1080, "quarantined": 0, "by_reason": {}}
    per = res.traces.group_by("teacher").agg(pl.len().alias("n"), pl.col("prompt_id").n_unique().alias("p"))
    assert dict(zip(per["teacher"], per["n"])) == {"GPT-3.5": 270, "GPT-4": 270, "GPT-4 Turbo": 270,
                                                   "PaLM 2 Medium": 270}
    assert set(per["p"]) == {270}
    assert res.traces["reference_answer"].null_count() == 0
    assert res.traces["prompt"].str.contains("@@").sum() == 0  # markup-free problem text
    path = adapters.champ_path()
    assert set(res.traces["source_uri"]) == {"champ-dataset==1.0.0:champ_dataset/dataset_files/v0.json"}
    assert set(res.traces["source_sha256"]) == {hashlib.sha256(path.read_bytes()).hexdigest()}
    assert set(res.traces["format"]) == {"champ"}
    # final_answer is the model's one-sentence summary; 12 solutions hit the length limit
    # and have none.
    assert res.traces["final_answer"].null_count() == 12
    assert read_source("champ:v0", verify=False).traces.height == 1080
    assert discover_teachers(["champ"]) == ["GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium"]


@champ
def test_champ_model_plus_setting_and_settings_filter():
    res = read_source("champ", teacher_mode="model+setting", verify=False)
    check_invariants(res)
    per = res.traces.group_by("teacher").len()
    assert per.height == 72 and set(per["len"]) == {270}  # 4 models x 18 settings
    assert "GPT-4/0-Shot" in set(per["teacher"]) and "PaLM 2 Medium/Misleading C w/ H" in set(per["teacher"])
    # Several settings under teacher_mode="model": one response per (problem, model) is kept.
    two = read_source("champ", champ_settings=("0-Shot", "5-Shot"), verify=False)
    check_invariants(two)
    assert two.traces.height == 1080 and two.summary()["by_reason"] == {"conflicting_duplicate": 1080}
    with pytest.raises(ValueError, match="unknown CHAMP setting"):
        read_source("champ", champ_settings=("7-Shot",))
    with pytest.raises(ValueError, match="teacher_mode"):
        read_source("champ", teacher_mode="nope")


@champ
def test_champ_annotation_on_a_sample():
    from lalp_resources.method.answers import annotate

    res = read_source("champ", verify=False)
    sample = annotate(res.traces.filter(pl.col("prompt_id").str.starts_with("P_Combinatorics_")).head(40))
    assert sample["verify_reason"].null_count() == 0
    assert sample["is_correct"].sum() > 0  # some summaries do match their reference


# --------------------------------------------------------------------------- real data


@pytest.mark.data
def test_zeroeval_folder_accuracy_matches_zeroeval_summary():
    if not ZEROEVAL_DIR.is_dir():
        pytest.skip(f"{ZEROEVAL_DIR} is absent: the shared zeroeval-math-l5 data is not on this machine")
    files = sorted(p for p in ZEROEVAL_DIR.glob("*.json") if p.name != "summary.json")
    teachers = [p.stem for p in files]
    assert len(teachers) == 8

    t0 = time.perf_counter()
    raw = ingest([ZEROEVAL_DIR], verify=False)
    t_read = time.perf_counter() - t0
    from lalp_resources.method.answers import annotate

    t0 = time.perf_counter()
    traces = annotate(raw.traces)
    t_verify = time.perf_counter() - t0
    print(f"\nread+parse+dedupe {t_read:.1f}s, annotate {traces.height} rows {t_verify:.1f}s")
    print("quarantine by reason:", raw.summary()["by_reason"])

    check_invariants(raw)
    assert raw.n_read == 8 * 721
    read_per_teacher = pl.concat([raw.traces.select("teacher"), raw.quarantine.select("teacher")]).group_by(
        "teacher").len()
    assert dict(zip(read_per_teacher["teacher"], read_per_teacher["len"])) == {t: 721 for t in teachers}
    assert raw.quarantine["reason"].null_count() == 0
    assert (raw.quarantine["reason"].str.len_chars() > 0).all()

    # Accuracy over all 721 problems; unparsable outputs and unverifiable answers count as wrong.
    ours = traces.group_by("teacher").agg((pl.col("is_correct").fill_null(False).sum() / 721 * 100).alias("acc"))
    ours = dict(zip(ours["teacher"], ours["acc"]))
    theirs = {r["Model"]: float(r["Acc"]) for r in json.loads((ZEROEVAL_DIR / "summary.json").read_text())}
    print(f"{'teacher':32s} {'ours':>6s} {'theirs':>6s} {'diff':>6s}")
    diffs = {}
    for t in teachers:
        diffs[t] = ours.get(t, 0.0) - theirs[t]
        print(f"{t:32s} {ours.get(t, 0.0):6.2f} {theirs[t]:6.2f} {diffs[t]:+6.2f}")
    # Same outputs, different graders: ZeroEval compares the first number of each answer,
    # we run math_verify on the parsed answer; both count a missing answer as wrong.
    # They agree to well under a point (max 0.42 when written); 3 points (~22 problems)
    # still fails on parser regressions (a lost opening fence cost one model 4.3 points).
    assert all(abs(d) <= 3.0 for d in diffs.values()), diffs
    assert t_verify < 60, f"annotate took {t_verify:.1f}s"
