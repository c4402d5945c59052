"""Fuzzing the adapters with Hypothesis: random and adversarial rows, field values and files.

Rows hold wrong types, NUL and separator characters, lone surrogates, bad UTF-8 bytes, empty
strings, nested junk, fields just under / at / over small limits, and repeats; they are
written as canonical JSONL, messages JSONL, Parquet and ZeroEval JSON, alone or together in a
folder with broken files. Whatever comes in: nothing raises, every row read is accepted or
quarantined (with the count known from the file itself where it can be), response ids are
unique and match their fields, accepted fields fit the limits, and no reader fails
(``reader_error`` would be a bug caught by read_one's safety net).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import check_ingest_invariants, limits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lalp_resources.adapters import expand_sources, finish, ingest, parse_json_output, read_one, response_id

# Small limits, so that generated fields land on both sides of them.
LIM = limits(max_prompt_chars=80, max_response_chars=120, max_teacher_chars=12, max_prompt_id_chars=12)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEPARATORS = ["\x1f", "\x00", "\n", "\r\n", "\u2028", "\ufeff", '"', "\\", ",", "|", "\t", "\x1e", "}", "]",
              "<|im_end|>", "<|im_start|>", "<|endoftext|>"]  # control-token strings: read as text, like any other
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
adversarial_text = st.lists(
    st.one_of(st.text(max_size=8), st.sampled_from(SEPARATORS), surrogates), max_size=10).map("".join)
# Lengths around the limits above (12, 80, 120), and one well past them.
sized_text = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "漢", "🙂", "\\", "\x00"]),
                       st.sampled_from([1, 11, 12, 13, 79, 80, 81, 119, 120, 121, 20_000]))
strings = st.one_of(adversarial_text, sized_text, st.sampled_from(["", " ", "\t\n", "p0", "t1", "q", "r"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), strings)
junk = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(strings, c, max_size=3)),
                    max_leaves=8)
# A field value: mostly a string, sometimes anything at all.
field = st.one_of(strings, strings, junk)


def rows_with_repeats(row_strategy):
    """Lists of rows with some of them repeated, in any order (exact duplicates; with the few
    plain ids and teachers below, conflicting ones come up by themselves)."""

    def add_repeats(rows):
        if not rows:
            return st.just(rows)
        picks = st.lists(st.integers(0, len(rows) - 1), max_size=3)
        return picks.flatmap(lambda idx: st.permutations(rows + [rows[i] for i in idx]))

    return st.lists(row_strategy, max_size=8).flatmap(add_repeats)


# Plausible values, so that many rows are accepted and ids, dedupe and limits get exercised;
# the separator pairs are the crafted response_id collision.


def mostly(usual, other, tenths: int = 8):
    """``usual`` in about ``tenths``/10 of draws, else ``other`` (st.one_of has no weights)."""
    return st.integers(0, 9).flatmap(lambda k: usual if k < tenths else other)


plain_ids = st.one_of(st.sampled_from(["p0", "p1", "p0\x1fevil", "p0\x00", "0"]), st.integers(-3, 3))
plain_teachers = st.sampled_from(["t1", "t2", "evil\x1fx", "x", "t1 "])
plain_texts = mostly(st.sampled_from(["q", "r", "r2", "\\boxed{2}", "a\x00b", "x" * 80, "y" * 120]), sized_text)
ids = mostly(plain_ids, strings)
teachers = mostly(plain_teachers, strings)
texts = mostly(plain_texts, strings)
answers = mostly(st.one_of(st.none(), plain_texts), st.one_of(strings, st.integers(), st.floats()), 7)
good_canonical = st.fixed_dictionaries(
    {"prompt_id": ids, "teacher": teachers, "prompt": texts, "response": texts},
    optional={"reference_answer": answers, "final_answer": answers},
)
hostile_canonical = st.fixed_dictionaries(
    {},
    optional={"prompt_id": st.one_of(field, st.integers(-3, 3)), "prompt": field, "teacher": field,
              "response": field, "reference_answer": field, "final_answer": field},
)
canonical_rows = mostly(good_canonical, hostile_canonical, 7)
turns = st.one_of(
    junk,
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"]),
                           "content": st.one_of(field, st.lists(st.fixed_dictionaries({"text": field}), max_size=2))}),
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": field}),
)
good_messages = st.builds(
    lambda history, prompt, response, extra: {
        "messages": [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        **extra},
    st.lists(turns, max_size=2), texts, texts,
    st.fixed_dictionaries({"teacher": teachers}, optional={"prompt_id": ids, "reference_answer": answers}),
)
hostile_messages = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(turns, max_size=4), junk)},
    optional={"teacher": field, "model": field, "prompt_id": field, "reference_answer": field, "final_answer": field},
)
message_rows = mostly(good_messages, hostile_messages, 7)
share_turns = st.one_of(
    junk,
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "user", "assistant", "tool", "x"]),
                           "value": field}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": field}),
)
think = st.builds(lambda a, b: f"<think>{a}</think>{b}", texts, texts)
good_sharegpt = st.builds(
    lambda system_turn, history, prompt, response, extra: {
        "conversations": [*system_turn, *history, {"from": "human", "value": prompt}, {"from": "gpt", "value": response}],
        **extra},
    st.lists(st.fixed_dictionaries({"from": st.just("system"), "value": texts}), max_size=1),
    st.lists(share_turns, max_size=2), texts, st.one_of(texts, think),
    st.fixed_dictionaries({}, optional={"teacher": teachers, "system": field, "prompt_id": ids, "id": field,
                                        "reference_answer": answers}),
)
hostile_sharegpt = st.fixed_dictionaries(
    {"conversations": st.one_of(st.lists(share_turns, max_size=4), junk)},
    optional={"teacher": field, "model": field, "prompt_id": field, "system": field, "reference_answer": field},
)
sharegpt_rows = mostly(good_sharegpt, hostile_sharegpt, 7)
good_alpaca = st.fixed_dictionaries(
    {"instruction": texts, "output": st.one_of(texts, think)},
    optional={"input": st.one_of(st.just(""), texts), "teacher": teachers, "prompt_id": ids,
              "reference_answer": answers, "system": field, "history": junk},
)
hostile_alpaca = st.fixed_dictionaries(
    {}, optional={"instruction": field, "input": field, "output": field, "teacher": field, "model": field,
                  "prompt_id": field, "final_answer": field},
)
alpaca_rows = mostly(good_alpaca, hostile_alpaca, 7)


def encodings():
    """How a JSON value becomes one line: ASCII escapes (lone surrogates as \\udXXX), raw UTF-8
    (lone surrogates as invalid bytes), or raw bytes spliced in."""
    return mostly(st.sampled_from(["ascii", "utf8"]), st.just("splice"))


def encode(obj, how: str, junk_bytes: bytes) -> bytes:
    if how == "ascii":
        return json.dumps(obj).encode()
    line = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "splice":
        cut = len(line) // 2
        line = line[:cut] + junk_bytes + line[cut:]
    return line


def jsonl_files(row_strategy):
    row_line = st.tuples(row_strategy, encodings(),
                         st.sampled_from([b"\xff", b"\xc3\x28", b"\x00", b"\xed\xa0\x80", b"\n"]))
    line = mostly(row_line, st.one_of(
        st.binary(max_size=40).map(lambda b: (None, "raw", b)),
        junk.map(lambda v: (v, "ascii", b"")),
    ))
    return rows_with_repeats(line).map(
        lambda lines: b"\n".join(raw if how == "raw" else encode(obj, how, raw) for obj, how, raw in lines))


def expected_jsonl_rows(data: bytes) -> int:
    """Rows a JSONL file holds: its non-blank lines (a leading byte-order mark is not content)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    return sum(1 for line in data.split(b"\n") if line.strip())


def check(res) -> None:
    check_ingest_invariants(res, LIM)
    assert "reader_error" not in res.summary()["by_reason"], res.quarantine.filter(
        pl.col("reason") == "reader_error")["detail"].to_list()
    for r in res.traces.iter_rows(named=True):
        assert r["response_id"] == response_id(r["prompt_id"], r["teacher"], r["prompt"], r["response"])
        assert r["teacher"].strip() and r["prompt"].strip() and r["response"].strip()


def ingest_file(name: str, data: bytes, fmt: str = "auto", verify: bool = False):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        return ingest([path], fmt, teacher_mode="model", limits=LIM, verify=verify)


# --------------------------------------------------------------------------- one format at a time


@FUZZ
@given(data=jsonl_files(canonical_rows), bom=st.booleans())
def test_fuzz_canonical_jsonl(data, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + data
    res = ingest_file("traces.jsonl", data, "canonical")
    check(res)
    assert res.n_read == expected_jsonl_rows(data)


@FUZZ
@given(data=jsonl_files(message_rows))
def test_fuzz_messages_jsonl(data):
    res = ingest_file("chats.jsonl", data, "messages")
    check(res)
    assert res.n_read == expected_jsonl_rows(data)


@FUZZ
@given(data=jsonl_files(sharegpt_rows))
def test_fuzz_sharegpt_jsonl(data):
    res = ingest_file("sharegpt.jsonl", data, "sharegpt")
    check(res)
    assert res.n_read == expected_jsonl_rows(data)


@FUZZ
@given(data=jsonl_files(alpaca_rows))
def test_fuzz_alpaca_jsonl(data):
    res = ingest_file("alpaca.jsonl", data, "alpaca")
    check(res)
    assert res.n_read == expected_jsonl_rows(data)


@FUZZ
@given(fmt=st.sampled_from(["sharegpt", "alpaca"]), data=st.data(), how=st.sampled_from(["ascii", "utf8", "bytes"]),
       noise=st.binary(max_size=60), explicit=st.booleans())
def test_fuzz_json_list(fmt, data, how, noise, explicit):
    """ShareGPT's and Alpaca's own files are one JSON list: hostile records, or a whole file of noise."""
    records = data.draw(rows_with_repeats(sharegpt_rows if fmt == "sharegpt" else alpaca_rows))
    raw = noise if how == "bytes" else encode(records, how, b"")
    res = ingest_file("rows.json", raw, fmt if explicit else "auto")
    check(res)
    whole_file = res.quarantine.filter(pl.col("source_row").is_null()).height
    if how != "bytes" and explicit:
        assert res.n_read == (1 if whole_file else len(records))


@FUZZ
@given(data=st.one_of(jsonl_files(canonical_rows), jsonl_files(message_rows), jsonl_files(sharegpt_rows),
                      jsonl_files(alpaca_rows)))
def test_fuzz_jsonl_detected(data):
    """Auto-detection on hostile JSONL: any reader, never a failure."""
    res = ingest_file("any.jsonl", data)
    check(res)
    assert res.n_read == expected_jsonl_rows(data)


def arrow_safe(s):
    """Arrow strings are UTF-8: lone surrogates cannot be stored (they become U+FFFD)."""
    return s.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if isinstance(s, str) else s


PARQUET_KINDS = {
    "string": (mostly(st.sampled_from(["p0", "p1", "t1", "q", "r", "r2", "x" * 80]),
                      st.one_of(st.none(), strings.map(arrow_safe))), pa.string()),
    "int": (st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), pa.int64()),
    "float": (st.one_of(st.none(), st.floats()), pa.float64()),
    "bool": (st.one_of(st.none(), st.booleans()), pa.bool_()),
    "binary": (st.one_of(st.none(), st.binary(max_size=10)), pa.binary()),
    "list": (st.one_of(st.none(), st.lists(strings.map(arrow_safe), max_size=3)), pa.list_(pa.string())),
}


@st.composite
def parquet_tables(draw):
    n = draw(st.integers(0, 10))
    names = draw(st.lists(st.sampled_from(["prompt_id", "prompt", "teacher", "response", "reference_answer",
                                           "final_answer", "extra"]), unique=True, max_size=7))
    cols = {}
    for name in names:
        # Mostly strings, so that many rows are well formed.
        kind = draw(st.sampled_from(["string"] * 4 + sorted(PARQUET_KINDS)))
        values, typ = PARQUET_KINDS[kind]
        cols[name] = pa.array(draw(st.lists(values, min_size=n, max_size=n)), typ)
    table = pa.table(cols) if cols else pa.table({"unrelated": pa.array(range(n), pa.int64())})
    repeat = draw(st.integers(0, table.num_rows))
    return pa.concat_tables([table, table.slice(0, repeat)])  # the first rows again: duplicates


@FUZZ
@given(table=parquet_tables(), row_group=st.integers(1, 8))
def test_fuzz_parquet(table, row_group):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "traces.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        res = ingest([path], teacher_mode="model", limits=LIM, verify=False)
    check(res)
    assert res.n_read == table.num_rows


def write_arrow(table: pa.Table, path: Path, stream: bool = True) -> None:
    """An Arrow IPC stream (what `datasets.save_to_disk` writes) or IPC file."""
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            writer.write_table(table, max_chunksize=3)


@FUZZ
@given(table=parquet_tables(), stream=st.booleans(), cut=st.booleans())
def test_fuzz_arrow(table, stream, cut):
    """`save_to_disk` shards: whole, or cut short by an interrupted copy (then one invalid_arrow row,
    after whatever rows could be read)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data-00000-of-00001.arrow"
        write_arrow(table, path, stream)
        if cut:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        res = ingest([path], teacher_mode="model", limits=LIM, verify=False)
    check(res)
    if not cut:
        assert res.n_read == table.num_rows


CONVERSATION_TYPES = {
    "conversations": pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])),
    "system": pa.string(), "teacher": pa.string(),
}


@FUZZ
@given(convs=st.lists(st.one_of(st.none(), st.lists(st.fixed_dictionaries({
    "from": st.one_of(st.none(), st.sampled_from(["human", "gpt", "system", "x"])),
    "value": st.one_of(st.none(), strings.map(arrow_safe))}), max_size=4)), max_size=8),
       teacher=st.one_of(st.none(), plain_teachers))
def test_fuzz_sharegpt_parquet(convs, teacher):
    """Hub shards of ShareGPT rows: Parquet structs carry every key, nulls included."""
    table = pa.table({"conversations": pa.array(convs, CONVERSATION_TYPES["conversations"]),
                      "teacher": pa.array([teacher] * len(convs), pa.string())})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-00000-of-00001.parquet"
        pq.write_table(table, path)
        res = ingest([path], teacher_mode="model", limits=LIM, verify=False)
    check(res)
    assert res.n_read == len(convs) and set(res.traces["format"]) <= {"sharegpt"}


output_fragments = st.lists(
    st.one_of(st.sampled_from(["```json\n", "```", "{", "}", '"reasoning": "', '"answer": ', '"', ",", "\n",
                               "\\frac{1}{2}", "\\", "\\n", "\\u12", "$x$", "[", "]", '"42"', "null"]),
              strings),
    max_size=15,
).map("".join)
zeroeval_records = st.one_of(
    junk,
    st.fixed_dictionaries({}, optional={"id": st.one_of(field, st.integers(0, 5)), "problem": field, "answer": field,
                                        "output": st.one_of(field, st.lists(st.one_of(output_fragments, junk),
                                                                            max_size=2))}),
    st.builds(lambda i, out, ans: {"id": i, "problem": "p", "answer": ans, "output": [out]},
              st.integers(0, 5), output_fragments, st.one_of(st.none(), strings, st.integers())),
)


@FUZZ
@given(records=rows_with_repeats(zeroeval_records), how=st.sampled_from(["ascii", "utf8", "bytes"]),
       noise=st.binary(max_size=60))
def test_fuzz_zeroeval(records, how, noise):
    """A ZeroEval file of hostile records, or a whole file of noise (one quarantine row)."""
    data = noise if how == "bytes" else encode(records, how, b"")
    res = ingest_file("some-model.json", data, "zeroeval")
    check(res)
    whole_file = res.quarantine.filter(pl.col("source_row").is_null()).height
    assert res.n_read == (1 if whole_file else len(records))
    assert set(res.traces["teacher"]) <= {"some-model"}


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(output_fragments, st.text(max_size=200)))
def test_fuzz_parse_json_output_returns_or_raises_valueerror(text):
    try:
        reasoning, answer = parse_json_output(text)
    except ValueError:
        return
    assert isinstance(reasoning, str) and reasoning.strip() and (answer is None or isinstance(answer, str))


# --------------------------------------------------------------------------- a folder of mixed files

file_kinds = st.one_of(
    jsonl_files(canonical_rows).map(lambda b: ("jsonl", b)),
    jsonl_files(message_rows).map(lambda b: ("jsonl", b)),
    jsonl_files(sharegpt_rows).map(lambda b: ("jsonl", b)),
    rows_with_repeats(alpaca_rows).map(lambda r: ("json", json.dumps(r).encode())),
    rows_with_repeats(zeroeval_records).map(lambda r: ("json", json.dumps(r).encode())),
    st.binary(max_size=80).flatmap(lambda b: st.sampled_from([("json", b), ("jsonl", b), ("parquet", b)])),
    st.just(("json", b"Remember to re-run the 8B model.\n")),
    parquet_tables().flatmap(lambda t: st.sampled_from([("parquet", t), ("parquet-truncated", t)])),
)


def write_kind(path: Path, kind: str, payload) -> Path:
    if kind.startswith("parquet") and isinstance(payload, pa.Table):
        pq.write_table(payload, path)
        if kind == "parquet-truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(payload)
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(file_kinds, min_size=1, max_size=4), verify=st.booleans())
def test_fuzz_folder_of_mixed_files(files, verify):
    """Each file is read on its own: a broken one never stops the others, and reading file by
    file (read_one, finish) gives what ingest of the whole folder gives."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for k, (kind, payload) in enumerate(files):
            suffix = "parquet" if kind.startswith("parquet") else kind
            write_kind(folder / f"f{k}.{suffix}", kind, payload)
        whole = ingest([folder], teacher_mode="model", limits=LIM, verify=verify)
        parts = [read_one(item, teacher_mode="model", limits=LIM) for item in expand_sources([folder])]
        by_file = finish(parts, verify=verify)
    check(whole)
    check(by_file)
    assert whole.summary() == by_file.summary()
    assert whole.traces["response_id"].to_list() == by_file.traces["response_id"].to_list()
    for part in parts:  # every file accounts for its rows on its own
        assert part.n_read == part.traces.height + part.quarantine.height
    if verify and whole.traces.height:
        assert whole.traces["verify_reason"].null_count() == 0


@pytest.mark.parametrize("fmt", ["canonical", "messages", "sharegpt", "alpaca", "zeroeval", "champ"])
def test_wrong_explicit_format_never_raises(tmp_path, fmt):
    """Forcing a reader onto files of another format: rows are quarantined, nothing raises."""
    files = {
        "c.jsonl": json.dumps({"prompt_id": "a", "teacher": "t", "prompt": "q", "response": "r"}).encode(),
        "m.jsonl": json.dumps({"teacher": "t", "messages": [{"role": "user", "content": "q"}]}).encode(),
        "s.jsonl": json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}).encode(),
        "a.json": json.dumps([{"instruction": "q", "input": "", "output": "a"}]).encode(),
        "z.json": json.dumps([{"id": 1, "problem": "q", "output": ["{}"]}]).encode(),
        "noise.json": b"\x00\xff not json",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"prompt_id": ["a"], "teacher": ["t"], "prompt": ["q"], "response": ["r"]}),
                   tmp_path / "p.parquet")
    for item in expand_sources([tmp_path]):
        res = read_one(item, fmt, teacher_mode="model", limits=LIM)
        check(res)
        assert res.n_read >= 1
