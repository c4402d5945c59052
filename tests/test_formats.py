"""ShareGPT conversations, Alpaca instructions and Hugging Face dataset layouts (issue 19): what
each row becomes, why a bad row is quarantined, what detection and source expansion find.

Small files written in tmp_path; the `save_to_disk` folders are written by the real `datasets`
package, the hub layout the way the hub's client lays a download out. Fuzzing of these formats
lives in tests/test_fuzz.py with the others.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import check_ingest_invariants, limits, write_lines

from lalp_resources.adapters import detect_format, expand_sources, ingest, read_one
from lalp_resources.adapters.hf import dataset_name
from lalp_resources.adapters.messages import prompt_hash

OPENTHOUGHTS_SYSTEM = "Your role as an assistant involves thoroughly exploring questions through a systematic long thinking process"


def read(source, fmt="auto", verify=False, **limit_overrides):
    return ingest(source, fmt, teacher_mode="model", limits=limits(**limit_overrides), verify=verify)


def reasons_by_row(res) -> dict[int, str]:
    return dict(zip(res.quarantine["source_row"].to_list(), res.quarantine["reason"].to_list()))


def stratos_row(question: str, answer: str, **extra) -> dict:
    """A row shaped like Bespoke-Stratos-17k / OpenThoughts-114k: a system field, one exchange."""
    return {"system": OPENTHOUGHTS_SYSTEM, "conversations": [
        {"from": "user", "value": question},
        {"from": "assistant", "value": f"<|begin_of_thought|>\n\nthink about {question}\n\n<|end_of_thought|>\n\n"
                                       f"<|begin_of_solution|>\n\n\\boxed{{{answer}}}\n\n<|end_of_solution|>"},
    ], **extra}


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_jsonl_rows_and_every_bad_row_kind(tmp_path):
    path = write_lines(tmp_path / "deepseek-r1.jsonl", [
        stratos_row("What is 2+2?", "4", reference_answer="4"),                                     # 1
        {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi?"},
                           {"from": "gpt", "value": "<think>greet</think>hello"},
                           {"from": "human", "value": "again?"}, {"from": "gpt", "value": "<think>x</think>hello again"},
                           {"from": "human", "value": "a trailing turn nobody answered"}]},            # 2 multi-turn
        {"teacher": "qwq", "prompt_id": "own-id", "conversations": [
            {"role": "user", "content": "Say 1"}, {"role": "assistant", "content": "1"}]},             # 3 own teacher, id
        "[\"not an object\"]",                                                                            # 4
        {"system": "s"},                                                                                 # 5 no conversations
        {"conversations": {"from": "human"}},                                                           # 6 not a list
        {"conversations": ["hi", {"from": "gpt", "value": "x"}]},                                      # 7 turn not object
        {"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]},                            # 8 turn without from
        {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},             # 9 value not text
        {"conversations": [{"from": "human", "value": "q"}]},                                          # 10 no assistant
        {"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]},          # 11 no user
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},          # 12 empty
        "{broken",                                                                                      # 13
        b'{"conversations": [], "x": "\xc3\x28"}',                                                      # 14
        {"conversations": [{"from": "human", "value": "q" * 50}, {"from": "gpt", "value": "a"}]},      # 15 too long
        {"teacher": 7, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},  # 16
    ])
    assert detect_format(path) == "sharegpt"
    res = read(path, max_prompt_chars=40)
    check_ingest_invariants(res)
    assert res.n_read == 16
    rows = {r["source_row"]: r for r in res.traces.iter_rows(named=True)}
    assert sorted(rows) == [1, 2, 3]
    one = rows[1]
    # the system field is not the prompt; the response keeps its thinking
    assert one["prompt"] == "What is 2+2?" and one["response"].startswith("<|begin_of_thought|>")
    assert one["teacher"] == "deepseek-r1"  # the file's stem: the rows name no teacher
    assert one["prompt_id"] == prompt_hash("What is 2+2?") and one["reference_answer"] == "4"
    assert rows[2]["prompt"] == "again?" and rows[2]["response"] == "<think>x</think>hello again"
    assert rows[3]["teacher"] == "qwq" and rows[3]["prompt_id"] == "own-id"
    assert set(res.traces["format"]) == {"sharegpt"}
    assert reasons_by_row(res) == {
        4: "invalid_type", 5: "missing_field", 6: "invalid_type", 7: "invalid_type", 8: "missing_field",
        9: "invalid_type", 10: "missing_field", 11: "missing_field", 12: "empty_response", 13: "invalid_json",
        14: "undecodable_bytes", 15: "prompt_too_long", 16: "invalid_type",
    }
    # quarantine rows carry the file's teacher when the row names none
    q = res.quarantine.filter(res.quarantine["source_row"] == 10).row(0, named=True)
    assert q["teacher"] == "deepseek-r1" and q["detail"] == "line 10: no assistant turn in 'conversations'"


def test_sharegpt_json_list_as_the_original_sharegpt_files(tmp_path):
    """ShareGPT's own files: one JSON list of {id, conversations}; the `id` names a conversation,
    not a question, so prompt_id stays the prompt's hash."""
    rows = [{"id": "QWJ3kqa_0", **stratos_row("Name a prime.", "2")}, {"id": "x_1", "conversations": "bad"}]
    path = tmp_path / "sharegpt_gpt4.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "sharegpt"
    res = read(path)
    check_ingest_invariants(res)
    assert res.summary()["accepted"] == 1 and reasons_by_row(res) == {1: "invalid_type"}
    r = res.traces.row(0, named=True)
    assert r["source_row"] == 0 and r["teacher"] == "sharegpt_gpt4" and r["prompt_id"] == prompt_hash("Name a prime.")
    assert res.quarantine["detail"][0].startswith("record 1: field 'conversations' must be a list")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": [')
    res = read(broken, "sharegpt")
    assert res.summary() == {"read": 1, "accepted": 0, "quarantined": 1, "by_reason": {"invalid_json": 1}}


# --------------------------------------------------------------------------- Alpaca


def test_alpaca_rows_and_every_bad_row_kind(tmp_path):
    rows = [
        {"instruction": "Add 2 and 2.", "input": "", "output": "2+2 = \\boxed{4}", "reference_answer": "4"},  # 0
        {"instruction": "Summarise:", "input": "A long text.", "output": "Short.", "model": "gpt-4"},          # 1
        {"instruction": "Name a colour.", "output": "Red."},                                                    # 2 no input
        {"input": "x", "output": "y"},                                                                          # 3 no instruction
        {"instruction": "q", "input": 5, "output": "y"},                                                        # 4
        {"instruction": "q", "output": ["y"]},                                                                  # 5
        {"instruction": " ", "input": "", "output": "y"},                                                       # 6 empty prompt
        {"instruction": "q", "input": "i", "output": ""},                                                       # 7 empty output
        {"instruction": "q", "input": "i" * 50, "output": "y"},                                                 # 8 too long
        "not a row",                                                                                            # 9
    ]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(rows))
    assert detect_format(path) == "alpaca"
    res = read(path, max_prompt_chars=40, verify=True)
    check_ingest_invariants(res)
    got = {r["source_row"]: r for r in res.traces.iter_rows(named=True)}
    assert sorted(got) == [0, 1, 2]
    assert got[0]["prompt"] == "Add 2 and 2." and got[0]["is_correct"] is True and got[0]["teacher"] == "alpaca_data"
    assert got[1]["prompt"] == "Summarise:\n\nA long text." and got[1]["teacher"] == "gpt-4"
    assert got[2]["prompt_id"] == prompt_hash("Name a colour.")
    assert reasons_by_row(res) == {3: "missing_field", 4: "invalid_type", 5: "invalid_type", 6: "empty_prompt",
                                   7: "empty_response", 8: "prompt_too_long", 9: "invalid_type"}
    jsonl = write_lines(tmp_path / "more.jsonl", rows[:3])
    assert detect_format(jsonl) == "alpaca" and read(jsonl).summary()["accepted"] == 3


def test_one_question_gets_one_prompt_id_across_formats(tmp_path):
    """Teachers in different datasets and formats are compared on the questions they share."""
    q = "What is 3*3?"
    write_lines(tmp_path / "r1.jsonl", [stratos_row(q, "9")])
    (tmp_path / "gpt.json").write_text(json.dumps([{"instruction": q, "input": "", "output": "\\boxed{9}"}]))
    write_lines(tmp_path / "chat.jsonl", [{"teacher": "qwen", "messages": [{"role": "user", "content": q},
                                                                           {"role": "assistant", "content": "9"}]}])
    res = read(tmp_path)
    check_ingest_invariants(res)
    assert sorted(res.traces["teacher"]) == ["gpt", "qwen", "r1"]
    assert set(res.traces["prompt_id"]) == {prompt_hash(q)}


# --------------------------------------------------------------------------- Hugging Face layouts


def test_save_to_disk_folders_are_recognised(tmp_path):
    import datasets

    rows = [stratos_row(f"Question {i}?", str(i)) for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    one = tmp_path / "stratos-r1"
    ds.save_to_disk(str(one), num_shards=2)
    items = expand_sources([one])
    assert [p.rsplit("/", 1)[1] for p in items] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert detect_format(items[0]) == "sharegpt"
    res = read(one)
    check_ingest_invariants(res)
    assert res.summary() == {"read": 5, "accepted": 5, "quarantined": 0, "by_reason": {}}
    assert set(res.traces["teacher"]) == {"stratos-r1"}  # the folder's name, not the shard's
    assert sorted(res.traces["prompt"]) == [f"Question {i}?" for i in range(5)]
    # a DatasetDict: every split, in the order listed, the teacher still the folder's name
    dd = datasets.DatasetDict({"train": ds.select(range(3)),
                               "test": datasets.Dataset.from_list([{"instruction": "Hi?", "output": "Hi."}])})
    both = tmp_path / "mixed-teacher"
    dd.save_to_disk(str(both))
    items = expand_sources([both])
    assert [p.split("/")[-2] for p in items] == ["train", "test"]
    res = read(both)
    check_ingest_invariants(res)
    assert res.summary()["accepted"] == 4 and set(res.traces["teacher"]) == {"mixed-teacher"}
    assert set(res.traces["format"]) == {"sharegpt", "alpaca"}


def test_hub_download_layout_is_recognised(tmp_path):
    """What `hf download ORG/NAME --repo-type dataset --local-dir DIR` leaves: README.md,
    .gitattributes, the client's .cache/, data/ shards of the default config, other configs beside."""
    root = tmp_path / "openthoughts-r1"
    (root / "data").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / ".cache" / "huggingface" / "download" / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: data/train-*\n---\n")
    (root / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (root / ".cache" / "huggingface" / "download" / "data" / "train-00000-of-00002.parquet.metadata").write_text("x")
    for shard in range(2):
        rows = [stratos_row(f"Q{shard}-{i}?", "1") for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"train-0000{shard}-of-00002.parquet")
    pq.write_table(pa.table({"problem": ["x"], "deepseek_reasoning": ["y"]}), root / "metadata" / "train-00000-of-00001.parquet")
    items = expand_sources([root])
    assert items == [str(root / "data" / f"train-0000{s}-of-00002.parquet") for s in range(2)]
    assert detect_format(items[0]) == "sharegpt"
    res = read(root)
    check_ingest_invariants(res)
    assert res.summary() == {"read": 6, "accepted": 6, "quarantined": 0, "by_reason": {}}
    assert set(res.traces["teacher"]) == {"openthoughts-r1"}
    # canonical rows in the same layout: their own teacher column wins
    canon = tmp_path / "canon"
    (canon / "data").mkdir(parents=True)
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["q"], "teacher": ["t9"], "response": ["r"]}),
                   canon / "data" / "train-00000-of-00001.parquet")
    assert detect_format(expand_sources([canon])[0]) == "canonical"
    assert read(canon).traces["teacher"].to_list() == ["t9"]


def test_dataset_names():
    from pathlib import PurePosixPath as P

    assert dataset_name(P("/x/r1/data/train-00000-of-00001.parquet"), local=False) == "r1"
    assert dataset_name(P("/x/r1/data/default/train-00000-of-00001.parquet"), local=False) == "r1"
    assert dataset_name(P("/x/r1/data-00000-of-00001.arrow"), local=False) == "r1"
    assert dataset_name(P("/x/r1/train/data-00000-of-00001.arrow"), local=False) == "r1"
    cache = "/root/.cache/huggingface/hub/datasets--bespokelabs--Bespoke-Stratos-17k/snapshots/abc123"
    assert dataset_name(P(f"{cache}/data/train-00000-of-00001.parquet"), local=False) == "Bespoke-Stratos-17k"
    assert dataset_name(P("/x/gpt-4o.jsonl"), local=False) == "gpt-4o"
    assert dataset_name(P("/home/me/data/gpt-4o.jsonl"), local=False) == "gpt-4o"  # not a hub shard


def test_a_truncated_arrow_shard_is_one_quarantine_row(tmp_path):
    import datasets

    folder = tmp_path / "r1"
    datasets.Dataset.from_list([stratos_row(f"Q{i}?", "1") for i in range(40)]).save_to_disk(str(folder))
    shard = folder / "data-00000-of-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    res = read_one(str(shard), teacher_mode="model", limits=limits())
    check_ingest_invariants(res)
    assert res.quarantine.filter(res.quarantine["source_row"].is_null())["reason"].to_list() == ["invalid_arrow"]


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_cli_and_settings_know_the_formats(fmt):
    from lalp_assets.cli import FORMATS as CLI_FORMATS
    from lalp_resources.adapters import FORMATS
    from lalp_resources.settings import Settings

    assert fmt in FORMATS and CLI_FORMATS == ["auto", *FORMATS]
    doc = dict((env, d) for env, _, d in Settings.documented())["LALP_FORMAT"]
    assert all(f"`{f}`" in doc for f in FORMATS)
