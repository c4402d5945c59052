"""The benchmark's helpers and its core run, on a tiny random model (fast; no real student)."""

from __future__ import annotations

import math

import polars as pl
import pytest

from lalp_resources.method.segmentation import segment
from benchmarks import benchmark as bm
from lalp_resources.engine import ScoreItem

TEXTS = [
    "First we note that x = 2.\n\nThen y = 3.5, e.g. by substitution.\n\nSo x + y = 5.5.\n\n"
    "We double-check: 2 + 3.5 = 5.5.\n\nThus the sum is 5.5.\n\nThe answer is $5.5$.",
    "The answer is 7.",
    "Step one: expand.\n\nStep two: simplify the result.",
]


def _items(tokenizer):
    from lalp_resources.method.tokenization import merge_unscored_steps

    prompts = ["What is x + y?", "What is x + y?", "Simplify (a+b)^2."]
    return [
        ScoreItem(f"r{i}", p, t, merge_unscored_steps(tokenizer, t, segment(t, "paragraph")))
        for i, (p, t) in enumerate(zip(prompts, TEXTS))
    ]


def test_format_final_line():
    line = bm.format_final_line(3.14159, 1.234e-6, 0.7777, 1.0234)
    assert line == "speedup=3.14 max_abs_diff=1.23e-06 peak_fraction=0.778 floor_ratio=1.023"
    assert bm.FINAL_LINE_RE.match(line)
    assert bm.format_final_line(12.0, 0.0, 0.5, 1.0) == "speedup=12.00 max_abs_diff=0.00e+00 peak_fraction=0.500 floor_ratio=1.000"
    assert bm.FINAL_LINE_RE.match(bm.format_final_line(float("inf"), float("nan")))
    assert not bm.FINAL_LINE_RE.match("speedup=3.14 max_abs_diff=1.23e-06")


def test_exact_floor_counts_shared_window_prefixes_once(smol_tokenizer):
    """fixed:0 windows share nothing; fixed:all windows all start at step 0 and are prefixes of
    GALP's pass where the tokenizer is prefix-stable (single newlines before words)."""
    from lalp_resources.method.tokenization import prefix_ids, tokenize_with_starts

    text = "Let x = 2.\nThen x^2 = 4.\nAdd 3 to get 7.\nSo the answer is 7."
    spans = segment(text, "line")
    item = ScoreItem("r", "Q?", text, spans)
    npre = len(prefix_ids(smol_tokenizer, "Q?", "chat"))
    n = len(tokenize_with_starts(smol_tokenizer, text)[0])
    full = bm.exact_floor(smol_tokenizer, [item], "fixed:all")
    assert full == {"response": n - 1, "prefix": npre, "total": n - 1 + npre}
    alone = bm.exact_floor(smol_tokenizer, [item], "fixed:0")
    own = [len(tokenize_with_starts(smol_tokenizer, text[a:b])[0]) - 1 for a, b in spans[1:]]
    assert alone["response"] == (n - 1) + sum(own)  # GALP covers step 0; every other step alone
    # two teachers answering the same prompt: one prefix
    two = bm.exact_floor(smol_tokenizer, [item, ScoreItem("s", "Q?", text, spans)], "fixed:all")
    assert two["prefix"] == npre and two["response"] == 2 * (n - 1)


def test_peak_fraction_and_ceiling_arithmetic(tiny_model):
    mf = bm.model_flops(tiny_model)
    cfg = tiny_model.config
    per_layer = 2 * (2 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * (cfg.hidden_size // 2)
                     + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert mf.body == cfg.num_hidden_layers * per_layer
    assert mf.head == 2 * cfg.hidden_size * cfg.vocab_size
    assert mf.pair == 4 * cfg.num_hidden_layers * cfg.hidden_size
    f = {"body": 6e9, "attention": 2e9, "head": 4e9, "total": 12e9}
    assert bm.ceiling_rate(f, {"body": 1e9, "head": 2e9}) == pytest.approx(12e9 / 10.0)
    rates = bm.matmul_rates(tiny_model, 256, 64, seconds=0.05)
    assert rates["body"] > 0 and rates["head"] > 0


def test_natural_order_and_sampling():
    assert sorted(["10", "2", "1", "b", "a"], key=bm.natural_key) == ["1", "2", "10", "a", "b"]
    rows = []
    for pid in ["0", "1", "2", "10", "3"]:
        for t in ["A", "B", "C"]:
            if (pid, t) == ("1", "C"):  # prompt 1 is not answered by every teacher
                continue
            rows.append({"prompt_id": pid, "teacher": t, "prompt": f"p{pid}", "response": f"{pid}-{t}",
                         "response_id": f"{pid}{t}"})
    df = pl.DataFrame(rows)
    got, teachers, pids = bm.sample_traces(df, 3, None)
    assert teachers == ["A", "B", "C"] and pids == ["0", "2", "3"]
    assert [(r["prompt_id"], r["teacher"]) for r in got] == [
        (p, t) for p in ["0", "2", "3"] for t in ["A", "B", "C"]
    ]
    # with two teachers prompt 1 qualifies; the order follows the teachers as given
    got, teachers, pids = bm.sample_traces(df, 2, ["B", "A"])
    assert pids == ["0", "1"] and teachers == ["B", "A"]
    assert [r["teacher"] for r in got] == ["B", "A", "B", "A"]
    # deterministic
    assert bm.sample_traces(df, 2, ["B", "A"])[0] == got
    with pytest.raises(ValueError, match="unknown teacher"):
        bm.sample_traces(df, 2, ["Z"])
    assert bm._teachers(["A,B", "C"]) == ["A", "B", "C"]


def test_gpu_peak_lookup():
    assert bm.gpu_peak_flops("NVIDIA H100 80GB HBM3") == (989e12, "H100")
    assert bm.gpu_peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert bm.gpu_peak_flops("NVIDIA H200")[0] == 989e12
    assert bm.gpu_peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bm.gpu_peak_flops("Some Unknown GPU") == (None, "")


def test_token_counting_and_compare():
    r = bm.RunResult("reference", 2.0, {("a", 0): -1.0, ("a", 1): -2.0}, {("a", 0): 3, ("a", 1): 4},
                     {"a": -1.5}, {"a": 7})
    e = bm.RunResult("engine", 0.5, {("a", 0): -1.0 + 1e-6, ("a", 1): -2.0}, {("a", 0): 3, ("a", 1): 4},
                     {"a": -1.5 + 3e-6}, {"a": 7})
    assert r.tokens == 14 and r.tokens_per_s == 7.0 and e.tokens_per_s == 28.0
    c = bm.compare(r, e)
    assert c.max_abs_diff == pytest.approx(1e-6) and c.worst == ("a", 0)
    assert c.galp_max_diff == pytest.approx(3e-6)
    assert c.missing == 0 and c.count_mismatches == 0
    # a step the engine lost makes the diff infinite, not silently small
    e.step_means.pop(("a", 1))
    e.step_tokens.pop(("a", 1))
    c = bm.compare(r, e)
    assert c.missing == 1 and math.isinf(c.max_abs_diff)


def test_reference_forward_tokens(smol_tokenizer):
    from lalp_resources.method.tokenization import prefix_ids

    item = _items(smol_tokenizer)[1]  # one step: one window + one GALP pass
    npre = len(prefix_ids(smol_tokenizer, item.prompt, "chat"))
    ntok = len(smol_tokenizer(item.text, add_special_tokens=False)["input_ids"])
    assert bm.reference_forward_tokens(smol_tokenizer, item) == (2 * (npre + ntok), 2)


def test_core_run_tiny_model(tiny_model, smol_tokenizer):
    items = _items(smol_tokenizer)
    logs = []
    res = bm.run_benchmark(tiny_model, smol_tokenizer, items, window="fixed:2", template="chat", log=logs.append)
    assert res.n_items == 3 and logs
    assert res.reference.steps == res.engine.steps == sum(len(it.spans) for it in items)
    assert res.reference.tokens == res.engine.tokens > 0
    c = res.comparison
    assert c.missing == 0 and c.count_mismatches == 0 and c.nan_mismatches == 0
    assert c.max_abs_diff < 1e-4, c
    assert c.galp_max_diff < 1e-4, c
    st = res.engine.extra["stats"]
    assert st["windows_total"] == res.engine.steps + len(items)
    assert res.reference_forward_tokens > st["tokens_forwarded"]  # the engine forwards less
    line = res.final_line
    m = bm.FINAL_LINE_RE.match(line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(res.speedup, abs=0.005)
    assert float(m.group(2)) == pytest.approx(c.max_abs_diff, rel=0.01, abs=1e-12)
    assert float(m.group(3)) == pytest.approx(res.peak_fraction, abs=5e-4) and 0 < res.peak_fraction
    # the engine never runs fewer token-forwards than the floor, and (no padding) barely more
    assert float(m.group(4)) == pytest.approx(res.floor_ratio, abs=5e-4) and 1.0 <= res.floor_ratio < 1.05
    assert res.flops["total"] == pytest.approx(res.flops["body"] + res.flops["head"] + res.flops["attention"])
    report = "\n".join(res.report())
    assert "engine stats:" in report and "tokens_forwarded=" in report and "GALP max" in report


def test_synthetic_trace_has_few_long_steps(smol_tokenizer):
    text, spans, n = bm.synthetic_trace(TEXTS, smol_tokenizer, 400, n_steps=4)
    assert 400 <= n <= 480
    assert len(spans) == 4
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_memory_one_cpu(tiny_model, smol_tokenizer):
    r = bm.memory_one(tiny_model, smol_tokenizer, "What is x + y?", TEXTS, 300, n_steps=3)
    assert r["steps"] == 3 and r["tokens"] >= 300 and r["galp_tokens"] == r["tokens"]
    assert r["peak_mb"] >= 0 and r["seconds"] > 0
    lines = bm.memory_table([r, {"target": 5, "error": "timeout"}])
    assert len(lines) == 4 and "timeout" in lines[2]


def test_bundle_round_trip_and_random_weights(tmp_path, tiny_model, smol_tokenizer):
    """A bundle (what a GPU lease can carry) holds the rows and the student's config and tokenizer;
    --random-weights rebuilds the same architecture, and the benchmark runs from it end to end."""
    from lalp_resources.student import Student

    rows = [{"response_id": f"r{i}", "prompt_id": str(i // 2), "teacher": f"t{i % 2}", "prompt": f"Q{i // 2}?",
             "response": t, "extra": "dropped"} for i, t in enumerate(TEXTS + TEXTS[:1])]
    student = Student(tiny_model, smol_tokenizer, "tiny", "0" * 64, "cpu", "float32")
    out = bm.write_bundle(tmp_path / "b", student, rows, "unit test", ["t0", "t1"], ["0", "1"])
    back, meta = bm.read_bundle(out)
    assert [r["response"] for r in back] == [r["response"] for r in rows] and "extra" not in back[0]
    assert meta["responses"] == 4 and meta["student"] == student.fingerprint

    args = bm.parse_args(["--bundle", str(out), "--random-weights", "--prompts", "1", "--device", "cpu"])
    sub, texts, source, teachers, pids = bm.load_inputs(args)
    assert pids == ["0"] and [r["response_id"] for r in sub] == ["r0", "r1"] and len(texts) == 4
    assert teachers == ["t0", "t1"] and source.startswith("bundle")
    rand = bm.load_bench_student(args)
    assert type(rand.model) is type(tiny_model)
    assert rand.model.config.num_hidden_layers == tiny_model.config.num_hidden_layers
    assert sum(p.numel() for p in rand.model.parameters()) == sum(p.numel() for p in tiny_model.parameters())
    assert rand.tokenizer("x + y = 5.5")["input_ids"] == smol_tokenizer("x + y = 5.5")["input_ids"]

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bm.main(["--bundle", str(out), "--random-weights", "--prompts", "1", "--device", "cpu", "--window", "fixed:2"]) == 0
    lines = buf.getvalue().strip().splitlines()
    m = bm.FINAL_LINE_RE.match(lines[-1])
    assert m and float(m.group(2)) < 1e-4, lines[-3:]


def test_random_weights_needs_a_bundle():
    with pytest.raises(SystemExit, match="needs --bundle"):
        bm.load_bench_student(bm.parse_args(["--random-weights"]))


def test_reading_a_folder_that_is_not_a_bundle_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a benchmark bundle"):
        bm.read_bundle(tmp_path)


def test_rank_correlations():
    a, b = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert bm.kendall_tau_b(a, b) == pytest.approx(0.6)      # 8 concordant, 2 discordant pairs
    assert bm.spearman(a, b) == pytest.approx(0.8)           # 1 - 6 * 4 / (5 * 24)
    assert bm.spearman(a, a[::-1]) == pytest.approx(-1) and bm.kendall_tau_b(a, a[::-1]) == pytest.approx(-1)
    assert bm._ranks([3.0, 1.0, 3.0]) == [2.5, 1.0, 2.5]
    assert math.isnan(bm.spearman([1.0], [2.0]))


def test_dtype_agreement_reports_ranking_changes():
    rows = [{"response_id": f"{p}{t}", "teacher": t, "prompt_id": p} for p in "xy" for t in "AB"]
    ref = bm.RunResult("fp32", 1.0, {("xA", 0): -1.0, ("xB", 0): -2.0, ("yA", 0): -1.5, ("yB", 0): -2.5},
                       {}, {}, {})
    close = bm.RunResult("bf16", 0.5, {k: v + 1e-3 for k, v in ref.step_means.items()}, {}, {}, {})
    ag = bm.dtype_agreement(close, ref, rows)
    assert ag["step_max_abs"] == pytest.approx(1e-3) and ag["teacher_spearman"] == pytest.approx(1.0)
    assert ag["teacher_order_equal"] and ag["same_pick"] == 2 == ag["prompts"]
    flipped = bm.RunResult("bf16", 0.5, {**ref.step_means, ("xB", 0): -0.5, ("yB", 0): -0.9}, {}, {}, {})
    ag = bm.dtype_agreement(flipped, ref, rows)
    assert not ag["teacher_order_equal"] and ag["same_pick"] == 0 and ag["teacher_kendall"] == pytest.approx(-1.0)


def test_host_rate_counts_the_engine_work(smol_tokenizer):
    items = _items(smol_tokenizer)
    r = bm.host_rate(smol_tokenizer, items, "fixed:2", "chat", repeats=1)
    floor = bm.exact_floor(smol_tokenizer, items, "fixed:2", "chat")
    assert r["token_forwards"] >= floor["total"] and r["host_s"] > 0 and r["host_rate"] > r["wall_rate"] > 0


def test_final_line_with_vs_vllm_and_median_spread():
    line = bm.format_final_line(2.5, 1e-6, 0.5, 1.0, 2.345)
    assert line.endswith(" vs_vllm=2.35") and bm.FINAL_LINE_RE.match(line).group(5) == "2.35"
    assert bm.FINAL_LINE_RE.match(bm.format_final_line(2.5, 1e-6, 0.5, 1.0)).group(5) is None
    assert bm.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert bm.median_spread([4.0, 1.0, 2.0, math.nan, 3.0]) == (2.5, 1.0, 4.0)


def test_rounds_interleave_and_report_per_round_ratios(tiny_model, smol_tokenizer):
    """Three rounds: each has its own ceiling, reference and engine; the order rotates; the ratios
    are per round, and the final line carries their medians."""
    items = _items(smol_tokenizer)
    logs = []
    r = bm.run_rounds(tiny_model, smol_tokenizer, items, rounds=3, window="fixed:2", log=logs.append)
    assert len(r.results) == 3 and all(len(x.rates) == 1 for x in r.results)
    firsts = [line.split(": ")[1].split(" ")[0] for line in logs if line.startswith("round ")][::2]
    assert firsts == ["reference", "engine", "reference"]  # two contenders: the order alternates
    ratios = r.ratios()
    assert len(ratios["speedup"]) == len(ratios["speedup_cpu"]) == len(ratios["peak_fraction"]) == 3
    m = bm.FINAL_LINE_RE.match(r.final_line)
    assert m and m.group(5) is None
    assert float(m.group(1)) == pytest.approx(bm.median_spread(ratios["speedup"])[0], abs=0.005)
    assert r.max_abs_diff < 1e-4
    text = "\n".join(r.report())
    assert "median" in text and "spread" in text and "CPU seconds" in text
