"""`make eval-steps`: the CHAMP first-wrong-step labels, their mapping onto steps, and the harness
end to end (a tiny random student for the plumbing; the real SmolLM2 student, `--limit 20`, slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from benchmarks import eval_steps as ev
from helpers import save_tiny_student

REPO = Path(__file__).resolve().parents[1]
LAST = re.compile(r"^n=(\d+) auroc_local=(\d\.\d{3}) auroc_global=(\d\.\d{3}) top1_local=(\d\.\d{3}) top1_global=(\d\.\d{3})$")


def test_champ_labels_are_the_444_first_wrong_steps():
    df = ev.champ_first_wrong()
    assert df.height == 444 and df["response_id"].n_unique() == 444
    assert set(df["teacher"].unique()) == {"GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium"}
    assert set(r.split("|")[-1] for r in df["response_id"]) == set(ev.SETTINGS)
    assert ((df["wrong_char"] >= 0) & (df["wrong_char"] < df["response"].str.len_chars())).all()
    assert ev.champ_first_wrong(5)["response_id"].to_list() == df["response_id"].head(5).to_list()


def test_first_wrong_step_is_the_step_holding_the_first_wrong_character():
    steps = pl.DataFrame({"response_id": ["r"] * 3 + ["s"], "step_index": [0, 1, 2, 0],
                          "char_start": [0, 10, 20, 0], "char_end": [10, 20, 30, 5]})
    labels = pl.DataFrame({"response_id": ["r", "s", "t"], "wrong_char": [15, 9, 0]})
    assert ev.first_wrong_steps(steps, labels) == {"r": 1}  # s: past its text; t: no steps
    # a step without tokens (NaN) is left out of the ranking; the wrong step's index follows
    got = ev.evaluate({"r": [-1.0, float("nan"), -3.0, -2.0]}, {"r": 2})
    assert got["n"] == 1 and got["top1"] == 1.0 and got["auroc"] == 1.0 and got["top1_chance"] == pytest.approx(1 / 3)
    assert ev.evaluate({"r": [-1.0, float("nan")]}, {"r": 1})["n"] == 0


def test_harness_end_to_end_with_a_tiny_student(tmp_path, smol_tokenizer, capsys):
    model = save_tiny_student(tmp_path / "tiny", smol_tokenizer, seed=2)
    argv = ["--limit", "3", "--model", str(model), "--device", "cpu", "--dtype", "float32",
            "--json", str(tmp_path / "out.json"), "--cache", str(tmp_path / "cache" / "c.jsonl")]
    assert ev.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m and m.group(1) == "3", lines[-1]
    assert any(line.startswith("fraction:0.25") for line in lines)
    import json

    out = json.loads((tmp_path / "out.json").read_text())
    # the global windows of the first steps are those of the local specs: taken from the shared cache
    assert out["timing"]["fraction:1.0"]["windows_cached"] > 0

    # A stopped run resumes from the cache file; a torn last line (a kill mid-write) is skipped.
    with open(tmp_path / "cache" / "c.jsonl", "a") as f:
        f.write('["a-key-cut-short", -1.')
    assert ev.main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines()[-1] == lines[-1]
    assert "(1 torn lines skipped)" in cap.err
    again = json.loads((tmp_path / "out.json").read_text())
    assert all(t["windows_scored"] == 0 and t["windows_cached"] > 0 for t in again["timing"].values())


def test_file_cache_round_trip(tmp_path):
    path = tmp_path / "deep" / "c.jsonl"
    c = ev.FileCache(str(path))
    assert len(c) == 0 and c.lookup(["k"]) == {}
    c.store([("k1", -3.5, 4, -1.25, -2.0), ("k2", -1.0, 2)])
    back = ev.FileCache(str(path))
    assert back.lookup(["k1", "k2", "k3"]) == {"k1": (-3.5, 4, -1.25, -2.0), "k2": (-1.0, 2, None, None)}
    assert back.torn == 0


@pytest.mark.slow
def test_make_eval_steps_limit_20_with_the_real_student(tmp_path):
    """What CI runs: `make eval-steps EVAL_ARGS=--limit 20` (the same module and arguments, with
    the cache file in a temporary folder so that nothing from an earlier run is read back)."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.eval_steps", "--limit", "20",
                          "--cache", str(tmp_path / "c.jsonl")], cwd=REPO,  # scored here, not read back
                         capture_output=True, text=True, check=True)
    last = res.stdout.strip().splitlines()[-1]
    m = LAST.match(last)
    assert m and m.group(1) == "20", res.stdout + res.stderr
    assert all(0.0 <= float(x) <= 1.0 for x in m.groups()[1:])
