"""Tests for lalp_resources.adapters: every input row is accepted or quarantined, never lost.

Unit tests build small files in tmp_path. The zeroeval data test reads the shared ZeroEval
MATH level-5 traces (helpers.ZEROEVAL; skips when absent); the CHAMP tests read the file
shipped inside the installed champ-dataset package. Fuzzing lives in tests/test_fuzz.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, ZEROEVAL, check_ingest_invariants, limits, trace_row, write_lines

from lalp_resources import adapters
from lalp_resources.adapters import (
    QUARANTINE_COLUMNS,
    TRACE_COLUMNS,
    dedupe,
    detect_format,
    discover_teachers,
    expand_sources,
    file_sha256,
    finish,
    ingest,
    parse_json_output,
    read_one,
    response_id,
)

ZEROEVAL_DIR = ZEROEVAL
row = trace_row
check_invariants = check_ingest_invariants


def read(source, fmt="auto", *, verify=True, teacher_mode="model", champ_settings=None, **limit_overrides):
    """ingest() of one source with the default limits, some overridden."""
    return ingest(source, fmt, teacher_mode=teacher_mode, limits=limits(**limit_overrides),
                  champ_settings=champ_settings, verify=verify)


def reasons_by_row(res) -> dict[int, str]:
    return dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["reason"].to_list()))


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
            row("p9", response="x" * 1001),  # 10 response too long (limit 1000 below)
            row("p10", response=["not", "a", "string"]),  # 11 invalid type
            row("p11", prompt=""),  # 12 empty prompt
            "[1, 2, 3]",  # 13 JSON but not an object
            '{"prompt_id": "p13", "teacher": "t1", "prompt": "q", "response": "\\ud800"}',  # 14 lone surrogate
            row("p14", teacher="t2", final_answer="given"),  # 15 ok, final_answer given
        ],
    )
    res = read(path, max_response_chars=1000)
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
        10: "response_too_long",
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
    assert q[10]["detail"] == "line 10: response is 1,001 characters; limit LALP_MAX_RESPONSE_CHARS=1000"
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
    res = read(path, verify=False)
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
    res = read(path, max_response_chars=40, verify=False)
    check_invariants(res)
    assert res.n_read == 7
    assert sorted(res.traces["prompt_id"].to_list()) == ["1", "2"]
    assert res.traces["source_row"].to_list() == [0, 1]  # 0-based
    assert reasons_by_row(res) == {
        2: "missing_field",
        3: "empty_response",
        4: "conflicting_duplicate",
        5: "duplicate",
        6: "response_too_long",
    }
    det = dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["detail"].to_list()))
    assert det[2] == "row 2: missing field 'teacher'"
    assert det[4].startswith("row 4:") and "row 0" in det[4]


def test_parquet_missing_column_quarantines_every_row(tmp_path):
    path = tmp_path / "no_teacher.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["q", "q"], "response": ["r", "r"]}), path)
    res = read(path, verify=False)
    check_invariants(res)
    assert res.traces.height == 0 and res.quarantine["reason"].to_list() == ["missing_field"] * 2


def test_corrupt_parquet_is_one_quarantine_row(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    res = read(path)
    check_invariants(res)
    assert res.summary() == {"read": 1, "accepted": 0, "quarantined": 1, "by_reason": {"invalid_parquet": 1}}
    q = res.quarantine.row(0, named=True)
    assert q["source_row"] is None and q["detail"].startswith("whole file: cannot open as Parquet")
    assert q["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


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
    res = read(path)
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

    res = read(d)  # a directory: summary.json is skipped
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
    res = read(path, fmt="zeroeval")
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
    res = read([a, b], verify=False)
    check_invariants(res)
    assert res.n_read == 5 and res.traces.height == 3
    q = res.quarantine.sort("source_row")
    assert q["reason"].to_list() == ["duplicate", "conflicting_duplicate"]
    assert all(a.resolve().as_uri() in d for d in q["detail"])
    assert set(q["source_uri"]) == {b.resolve().as_uri()}
    # Reading the same file twice: every row of the second copy is a duplicate.
    res2 = read([a, a], verify=False)
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


def test_response_id_hashes_a_canonical_json_encoding():
    rid = response_id("p", "t", "q", "r")
    assert rid == hashlib.sha256(b'["p","t","q","r"]').hexdigest()[:16]
    assert len(rid) == 16 and int(rid, 16) >= 0 and rid != response_id("p", "t", "q", "r2")
    assert response_id("é", "t", "q", "r") == hashlib.sha256('["é","t","q","r"]'.encode()).hexdigest()[:16]


def test_response_ids_cannot_collide_through_a_separator(tmp_path):
    """Joining fields with U+001F let two different rows share an id; JSON keeps them apart."""
    assert response_id("p0\u001fevil", "x", "q", "r") != response_id("p0", "evil\u001fx", "q", "r")
    path = write_lines(tmp_path / "crafted.jsonl", [
        row("p0\u001fevil", teacher="x", prompt="q", response="r"),
        row("p0", teacher="evil\u001fx", prompt="q", response="r"),
    ])
    res = read(path, verify=False)
    check_invariants(res)
    assert res.summary()["accepted"] == 2
    ids = res.traces["response_id"].to_list()
    assert len(set(ids)) == 2
    assert sorted(zip(res.traces["prompt_id"], res.traces["teacher"])) == [("p0", "evil\u001fx"), ("p0\u001fevil", "x")]


def test_discover_teachers(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row("p1", teacher="zeta"), row("p1", teacher="alpha"), "bad",
                                           row("p2", teacher="t" * 300)])  # over the teacher limit
    assert discover_teachers([a], teacher_mode="model", limits=limits()) == ["alpha", "zeta"]


def test_detection(tmp_path):
    canon = write_lines(tmp_path / "c.jsonl", ["garbage first", row()])
    assert detect_format(canon) == "canonical"
    jsonl_in_json = write_lines(tmp_path / "c.json", [row()])
    assert detect_format(jsonl_in_json) == "canonical"
    pq.write_table(pa.table({"prompt_id": ["a"]}), tmp_path / "no_extension")
    assert detect_format(tmp_path / "no_extension") == "canonical"  # Parquet magic number
    (tmp_path / "broken_list.json").write_text('[{"id": 1, ')
    assert detect_format(tmp_path / "broken_list.json") == "zeroeval"  # its reader quarantines it whole
    assert detect_format("champ") == "champ"
    for name, content in [("x.csv", "a,b\n"), ("obj.json", '{"not": "a known layout"}'), ("n.json", "just notes")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="cannot detect"):
            detect_format(tmp_path / name)


@pytest.mark.parametrize("name, content, detail", [
    ("x.csv", "a,b\n", "unknown extension '.csv'"),
    ("obj.json", '{"not": "a known layout"}', "a JSON object of no known layout"),
])
def test_undetectable_file_is_one_quarantine_row(tmp_path, name, content, detail):
    (tmp_path / name).write_text(content)
    res = read(tmp_path / name)
    check_invariants(res)
    assert res.summary() == {"read": 1, "accepted": 0, "quarantined": 1, "by_reason": {"unknown_format": 1}}
    assert detail in res.quarantine["detail"][0] and res.quarantine["format"][0] is None


def test_configuration_mistakes_raise(tmp_path):
    canon = write_lines(tmp_path / "c.jsonl", [row()])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        read(canon, fmt="csv")
    with pytest.raises(ValueError, match="teacher_mode"):
        read(canon, teacher_mode="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.json"):
        read(tmp_path / "empty")
    with pytest.raises(TypeError, match="Limits"):
        ingest(canon, teacher_mode="model", limits={"max_prompt_chars": 1})


# --------------------------------------------------------------------------- limits


def test_limits_have_no_defaults_and_must_be_positive():
    with pytest.raises(TypeError):
        adapters.Limits()  # the defaults live in lalp_resources/settings.py
    with pytest.raises(ValueError, match="max_teacher_chars"):
        limits(max_teacher_chars=0)
    with pytest.raises(ValueError, match="max_prompt_chars"):
        limits(max_prompt_chars=True)
    lim = limits()
    with pytest.raises(AttributeError):
        lim.max_prompt_chars = 5  # frozen


def test_every_limited_field_is_quarantined_with_its_limit(tmp_path):
    lim = dict(max_prompt_chars=12, max_response_chars=20, max_teacher_chars=5, max_prompt_id_chars=4)
    path = write_lines(tmp_path / "sizes.jsonl", [
        row("p1", teacher="t", prompt="q" * 12, response="r" * 20, reference_answer="a" * 20),  # 1 ok: at the limits
        row("p2", teacher="t", prompt="q" * 13),  # 2
        row("p3", teacher="t", response="r" * 21),  # 3
        row("p4", teacher="t" * 6),  # 4
        row("p" * 5, teacher="t"),  # 5
        row(12345, teacher="t"),  # 6: an integer id counts by its digits
        row("p7", teacher="t", reference_answer="a" * 21),  # 7
        row("p8", teacher="t", final_answer="a" * 21),  # 8
    ])
    res = read(path, verify=False, **lim)
    check_invariants(res, limits(**lim))
    assert res.traces["prompt_id"].to_list() == ["p1"]
    q = {r["source_row"]: (r["reason"], r["detail"]) for r in res.quarantine.iter_rows(named=True)}
    assert q == {
        2: ("prompt_too_long", "line 2: prompt is 13 characters; limit LALP_MAX_PROMPT_CHARS=12"),
        3: ("response_too_long", "line 3: response is 21 characters; limit LALP_MAX_RESPONSE_CHARS=20"),
        4: ("teacher_too_long", "line 4: teacher is 6 characters; limit LALP_MAX_TEACHER_CHARS=5"),
        5: ("prompt_id_too_long", "line 5: prompt_id is 5 characters; limit LALP_MAX_PROMPT_ID_CHARS=4"),
        6: ("prompt_id_too_long", "line 6: prompt_id is 5 characters; limit LALP_MAX_PROMPT_ID_CHARS=4"),
        7: ("answer_too_long", "line 7: reference_answer is 21 characters; limit LALP_MAX_RESPONSE_CHARS=20"),
        8: ("answer_too_long", "line 8: final_answer is 21 characters; limit LALP_MAX_RESPONSE_CHARS=20"),
    }
    # The quarantine's prompt_id / teacher columns are cut to the limits too.
    assert res.quarantine["teacher"].str.len_chars().max() <= 5
    assert res.quarantine["prompt_id"].str.len_chars().max() <= 4


def test_limits_apply_to_every_format(tmp_path):
    lim = dict(max_prompt_chars=10, max_response_chars=30)
    msgs = write_lines(tmp_path / "m.jsonl", [
        {"teacher": "t", "messages": [{"role": "user", "content": "q" * 11}, {"role": "assistant", "content": "a"}]},
        {"teacher": "t", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 31}]},
    ])
    zpath = tmp_path / "model.json"
    long_output = '{"reasoning": "' + "r" * 40 + '", "answer": "1"}'  # 72 characters
    zpath.write_text(json.dumps([
        {"id": 0, "problem": "q" * 11, "answer": "1", "output": ['{"reasoning": "r", "answer": "1"}']},
        {"id": 1, "problem": "q", "answer": "1", "output": [long_output]},
    ]))
    ppath = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "teacher": ["t", "t"], "prompt": ["q" * 11, "q"],
                             "response": ["r", "r" * 31]}), ppath)
    for path, fmt in [(msgs, "messages"), (zpath, "zeroeval"), (ppath, "canonical")]:
        res = read(path, verify=False, **lim)
        check_invariants(res)
        assert res.quarantine["reason"].to_list() == ["prompt_too_long", "response_too_long"], fmt
    z = read(zpath, verify=False, **lim).quarantine["detail"].to_list()
    # A ZeroEval response is cut from output[0]: the output is bounded before it is parsed.
    assert len(long_output) == 72
    assert z[1] == "record 1: output[0] is 72 characters; limit LALP_MAX_RESPONSE_CHARS=30"


_MEMORY_PROBE = """
import json, resource, sys
from lalp_resources import adapters

def current_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

lim = adapters.Limits(max_prompt_chars=100_000, max_response_chars=200_000, max_teacher_chars=256,
                      max_prompt_id_chars=256)
before = current_kib()
res = adapters.ingest([sys.argv[1]], teacher_mode="model", limits=lim)
# VmHWM belongs to this process's own address space; ru_maxrss would carry the parent's peak
# across fork+exec (a test process that imported torch would look like a 400 MB ingest)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"growth_kib": peak - before, "summary": res.summary(),
                  "quarantine": res.quarantine.drop("source_uri", "source_sha256").to_dicts(),
                  "quarantine_bytes": res.quarantine.estimated_size(), "accepted": res.traces["prompt_id"].to_list()}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
def test_50mb_prompt_is_quarantined_before_it_costs_memory(tmp_path):
    big = 50 * 1024 * 1024
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(row("small")) + "\n")
        f.write('{"prompt_id": "big", "teacher": "t1", "response": "r", "prompt": "')
        for _ in range(big // (1 << 20)):
            f.write("x" * (1 << 20))
        f.write('"}\n')
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True,
                         cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["summary"] == {"read": 2, "accepted": 1, "quarantined": 1, "by_reason": {"prompt_too_long": 1}}
    assert probe["accepted"] == ["small"]
    q = probe["quarantine"][0]
    assert q["detail"] == "line 2: prompt is 52,428,800 characters; limit LALP_MAX_PROMPT_CHARS=100000"
    assert q["prompt_id"] == "big" and len(q["raw_excerpt"]) <= 300
    assert probe["quarantine_bytes"] < 100_000  # nothing of the prompt rides along
    growth = probe["growth_kib"] * 1024
    print(f"\nfile {size / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.0f} MiB ({growth / size:.1f}x)")
    assert growth < 5 * size


# --------------------------------------------------------------------------- one file at a time


def test_non_json_notes_file_in_a_folder_is_quarantined_and_the_rest_ingested(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    write_lines(d / "a.jsonl", [row("p1"), row("p2")])
    (d / "notes.json").write_text("Remember to re-run the 8B model.\n")
    write_lines(d / "z.jsonl", [row("p3")])
    res = read(d, verify=False)
    check_invariants(res)
    assert res.summary() == {"read": 4, "accepted": 3, "quarantined": 1, "by_reason": {"unknown_format": 1}}
    q = res.quarantine.row(0, named=True)
    assert q["source_uri"] == (d / "notes.json").resolve().as_uri() and q["source_row"] is None
    assert q["source_sha256"] == hashlib.sha256((d / "notes.json").read_bytes()).hexdigest()
    assert q["detail"].startswith("whole file: cannot detect the format of") and "not JSON or JSONL" in q["detail"]
    assert q["raw_excerpt"] == ""


def test_half_copied_parquet_in_a_folder_is_quarantined_and_the_rest_ingested(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(50)], "teacher": ["t"] * 50,
                             "prompt": ["q"] * 50, "response": [f"r{i}" for i in range(50)]}), d / "a.parquet")
    data = (d / "a.parquet").read_bytes()
    (d / "b.parquet").write_bytes(data[: len(data) // 2])  # copy interrupted half-way
    write_lines(d / "c.jsonl", [row("p100", teacher="u")])
    res = read(d, verify=False)
    check_invariants(res)
    assert res.summary() == {"read": 52, "accepted": 51, "quarantined": 1, "by_reason": {"invalid_parquet": 1}}
    q = res.quarantine.row(0, named=True)
    assert q["source_uri"].endswith("/b.parquet") and q["source_row"] is None and q["format"] == "canonical"
    assert q["source_sha256"] == hashlib.sha256(data[: len(data) // 2]).hexdigest()
    assert q["detail"].startswith("whole file: cannot open as Parquet")


def test_file_that_vanished_or_is_not_a_regular_file_is_quarantined(tmp_path):
    gone = write_lines(tmp_path / "gone.jsonl", [row()])
    items = expand_sources([gone])
    gone.unlink()  # removed between listing and reading
    res = read_one(items[0], teacher_mode="model", limits=limits())
    check_invariants(res)
    assert res.summary()["by_reason"] == {"unreadable_file": 1}
    assert res.quarantine["source_sha256"][0] is None and "no such file" in res.quarantine["detail"][0]
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it would block forever: never opened
    good = write_lines(tmp_path / "good.jsonl", [row()])
    res = read([fifo, good], verify=False)
    check_invariants(res)
    assert res.summary() == {"read": 2, "accepted": 1, "quarantined": 1, "by_reason": {"unreadable_file": 1}}
    assert "not a regular file" in res.quarantine["detail"][0]


def test_expand_sources_and_file_sha256(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ["b.jsonl", "a.parquet", "c.json", "summary.json", "readme.txt"]:
        (d / name).write_text("x")
    (d / "sub").mkdir()
    single = write_lines(tmp_path / "one.jsonl", [row()])
    assert expand_sources([single, d, "champ"]) == [
        str(single), str(d / "a.parquet"), str(d / "b.jsonl"), str(d / "c.json"), "champ"]
    assert expand_sources(str(single)) == [str(single)]
    with pytest.raises(FileNotFoundError, match="nope.jsonl") as err:
        expand_sources([single, tmp_path / "nope.jsonl"])
    assert err.value.filename == str(tmp_path / "nope.jsonl")
    assert file_sha256(single) == hashlib.sha256(single.read_bytes()).hexdigest()


def test_file_sha256_of_the_champ_spec():
    try:
        path = adapters.champ_path()
    except ValueError:
        pytest.skip("champ-dataset package not installed")
    assert file_sha256("champ") == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_one_then_finish_equals_ingest(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [row("p1"), row("p2"), row("p2"), "{bad"])
    b = write_lines(tmp_path / "b.jsonl", [row("p1"), row("p2", response="changed"), row("p3")])
    one = read_one(a, teacher_mode="model", limits=limits())
    # Per-file: the repeated line is already a duplicate; answers are not verified yet.
    assert one.summary() == {"read": 4, "accepted": 2, "quarantined": 2,
                             "by_reason": {"duplicate": 1, "invalid_json": 1}}
    assert one.traces["verify_reason"].null_count() == 2
    parts = [one, read_one(b, teacher_mode="model", limits=limits())]
    done = finish(parts)
    check_invariants(done)
    assert done.summary() == read([a, b]).summary() == {
        "read": 7, "accepted": 3, "quarantined": 4,
        "by_reason": {"conflicting_duplicate": 1, "duplicate": 2, "invalid_json": 1}}
    assert done.traces["verify_reason"].null_count() == 0  # finish verified the answers
    cross = done.quarantine.filter(pl.col("source_uri") == b.resolve().as_uri())
    assert all(a.resolve().as_uri() in d for d in cross["detail"])  # names the row it repeats
    assert finish([]).summary() == {"read": 0, "accepted": 0, "quarantined": 0, "by_reason": {}}


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
    res = read("champ", verify=False)
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
    assert read("champ:v0", verify=False).traces.height == 1080
    assert discover_teachers(["champ"], teacher_mode="model", limits=limits()) == [
        "GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium"]


@champ
def test_champ_model_plus_setting_and_settings_filter():
    res = read("champ", teacher_mode="model+setting", verify=False)
    check_invariants(res)
    per = res.traces.group_by("teacher").len()
    assert per.height == 72 and set(per["len"]) == {270}  # 4 models x 18 settings
    assert "GPT-4/0-Shot" in set(per["teacher"]) and "PaLM 2 Medium/Misleading C w/ H" in set(per["teacher"])
    # Several settings under teacher_mode="model": one response per (problem, model) is kept.
    two = read("champ", champ_settings=("0-Shot", "5-Shot"), verify=False)
    check_invariants(two)
    assert two.traces.height == 1080 and two.summary()["by_reason"] == {"conflicting_duplicate": 1080}
    with pytest.raises(ValueError, match="unknown CHAMP setting"):
        read("champ", champ_settings=("7-Shot",))
    with pytest.raises(ValueError, match="teacher_mode"):
        read("champ", teacher_mode="nope")


@champ
def test_champ_annotation_on_a_sample():
    from lalp_resources.method.answers import annotate

    res = read("champ", verify=False)
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
    raw = read(ZEROEVAL_DIR, verify=False)
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
