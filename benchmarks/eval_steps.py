"""Are low step scores where the reasoning goes wrong? Step scores checked on human labels.

The `champ-dataset` package's `fws_annotations` hold, for 444 responses of the 4 CHAMP models
(settings "No C w/o H" and "Direct C w/ H"), the character span of the first wrong step (the other
annotated responses have no mistake). Each response is segmented as the pipeline does (paragraph
steps, steps without a student token merged), scored with the student and the engine under three
windows, and the first wrong step is the step holding the span's first character:

- local: `fixed:4` (the pipeline's default) and `fraction:0.25`;
- global: `fraction:1.0` (every step given the whole preceding response).

Per window: top-1 hit rate (the weakest step is the first wrong one; chance = the mean of
1/steps), mean rank percentile of the first wrong step among the response's steps (0 = the
weakest, chance 0.5) and the AUROC of the first wrong step against the steps before it (chance
0.5); definitions in lalp_resources/diagnostics.py and docs/method.md. Each response is scored once
per window spec; the three engines share one score cache, so a window that two specs have in common
(the first steps' windows all start at the response's start) is computed once.

    python -m benchmarks.eval_steps [--limit N] [--threads 2] [--model smollm2] [--json out.json]
                                    [--cache .eval_steps/cache.jsonl]

The full run takes over an hour on two CPU cores, so every scored window is appended to a cache
file as it is computed (`--cache`, default `.eval_steps/cache.jsonl`, git-ignored): a run that is
stopped resumes where it was, and a rerun of finished work is read back, not recomputed. The cache
file is per student (its fingerprint is in every key); `--cache ''` keeps it in memory only.

The last line: n=<responses> auroc_local=<a> auroc_global=<b> top1_local=<c> top1_global=<d>
(local = fixed:4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

from lalp_resources import diagnostics as dx

SETTINGS = ("No C w/o H", "Direct C w/ H")
WINDOWS = (("fixed:4", "local"), ("fraction:0.25", "local"), ("fraction:1.0", "global"))
LOCAL, GLOBAL = "fixed:4", "fraction:1.0"


def champ_first_wrong(limit: int | None = None) -> pl.DataFrame:
    """One row per annotated response with a first wrong step: response_id, prompt, response, and
    the first wrong character (`wrong_char`), in a fixed order (problem id, model|setting)."""
    from lalp_resources.adapters.champ import champ_path

    data = json.loads(champ_path().read_text(encoding="utf-8"))
    rows = []
    for pid in sorted(data["problems"]):
        prob = data["problems"][pid]
        for key in sorted(prob.get("fws_annotations") or {}):
            ann = prob["fws_annotations"][key]
            if key.split("|")[-1] not in SETTINGS or ann.get("start_idx") in (None, ""):
                continue
            conv = prob["conversations"].get(key)
            if not conv:
                continue
            user = next(m["text"] for m in conv["messages"] if m["role"] == "User")
            rows.append({"response_id": f"{pid}|{key}", "prompt_id": pid, "teacher": key.split("|")[0], "prompt": user,
                         "response": ann["text"], "wrong_char": int(ann["start_idx"])})
    df = pl.DataFrame(rows)
    return df.head(limit) if limit else df


def first_wrong_steps(steps: pl.DataFrame, labels: pl.DataFrame) -> dict[str, int]:
    """response_id -> the index of the step holding the first wrong character."""
    spans = {}
    for rid, lo, hi in steps.sort("response_id", "step_index").select("response_id", "char_start", "char_end").iter_rows():
        spans.setdefault(rid, []).append((lo, hi))
    out = {}
    for rid, char in labels.select("response_id", "wrong_char").iter_rows():
        i = dx.step_at(spans.get(rid, []), char)
        if i is not None:
            out[rid] = i
    return out


def evaluate(step_scores: dict[str, list[float]], wrong: dict[str, int]) -> dict:
    """The metrics over responses, from each response's step scores (NaN: a step without tokens,
    left out; a response whose first wrong step has no score is not counted)."""
    per, chance = [], []
    for rid, w in wrong.items():
        scores = step_scores.get(rid)
        if scores is None or scores[w] != scores[w]:
            continue
        keep = [i for i, s in enumerate(scores) if s == s]
        per.append(dx.first_wrong_metrics([scores[i] for i in keep], keep.index(w)))
        chance.append(1 / len(keep))
    out = dx.summarize_first_wrong(per)
    out["top1_chance"] = sum(chance) / len(chance) if chance else None
    return out


class FileCache:
    """The engine's score cache, appended to a JSON-lines file as windows are scored, so a
    stopped run resumes. A torn last line (a kill mid-write) is skipped on reading."""

    def __init__(self, path: str):
        from lalp_resources.engine import DictCache

        self.mem, self.path, self.torn = DictCache(), Path(path), 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        self.mem.store([json.loads(line)])
                    except (ValueError, TypeError):
                        self.torn += 1

    def __len__(self) -> int:
        return len(self.mem.data)

    def lookup(self, keys):
        return self.mem.lookup(keys)

    def store(self, rows):
        rows = [list(r) for r in rows]
        self.mem.store(rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="the first N labelled responses (0 = all 444)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the student (default 2)")
    ap.add_argument("--model", default="smollm2", help="the student (as LALP_MODEL; default the embedded SmolLM2)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    ap.add_argument("--cache", default=".eval_steps/cache.jsonl",
                    help="append scored windows here and resume from it ('' = in memory only)")
    args = ap.parse_args(argv)

    import torch

    from lalp_resources import pipeline
    from lalp_resources.engine import DictCache, ScoringEngine
    from lalp_resources.method.segmentation import segment
    from lalp_resources.student import load_student

    t0 = time.perf_counter()
    labels = champ_first_wrong(args.limit or None)
    st = load_student(args.model, device=args.device, dtype=args.dtype)
    steps = pipeline.segment_traces(labels, lambda text: (segment(text, "paragraph"), None), st.tokenizer)
    wrong = first_wrong_steps(steps, labels)
    items = pipeline.score_items(steps, labels)
    n_steps = steps.height
    print(f"{labels.height} labelled responses ({len(wrong)} with the first wrong character inside a step), "
          f"{n_steps} steps; student {st.fingerprint} on {st.device}/{st.dtype}", file=sys.stderr)
    # Shared by the three window specs: a window they have in common is scored once.
    cache = FileCache(args.cache) if args.cache else DictCache()
    if args.cache:
        print(f"score cache {args.cache}: {len(cache)} windows from earlier runs"
              + (f" ({cache.torn} torn lines skipped)" if cache.torn else ""), file=sys.stderr)
    namespace = f"{st.fingerprint}|chat|{st.dtype}"
    results, timing = {}, {}
    for window, _ in WINDOWS:
        eng = ScoringEngine(st.model, st.tokenizer, window=window, template="chat", namespace=namespace, cache=cache,
                            galp=False)
        if st.device == "cpu":
            torch.set_num_threads(args.threads)  # after the engine, which pins to the cores it may use
        t1 = time.perf_counter()
        scores: dict[str, list[float]] = {}
        done = set()
        for chunk in eng.score(items):
            cache.store(chunk.new_cache_rows)
            for s in chunk.steps:
                scores.setdefault(s.response_id, []).append(s.mean_logprob)
                done.add(s.response_id)
            el = time.perf_counter() - t1
            print(f"  {window}: {len(done)}/{len(items)} responses, {el:.0f}s", file=sys.stderr, flush=True)
        timing[window] = {"seconds": round(time.perf_counter() - t1, 1), "windows_scored": eng.stats.windows_scored,
                          "windows_cached": eng.stats.windows_cached, "tokens_forwarded": eng.stats.tokens_forwarded}
        results[window] = evaluate(scores, wrong)
    total = time.perf_counter() - t0
    print(f"\n{'window':<14} {'kind':<7} {'n':>4} {'top1':>6} {'chance':>6} {'mean pct':>8} {'auroc':>6} {'pairs':>6} "
          f"{'seconds':>7} {'scored':>7} {'cached':>7}")
    for window, kind in WINDOWS:
        r, t = results[window], timing[window]
        print(f"{window:<14} {kind:<7} {r['n']:>4} {r['top1']:>6.3f} {r['top1_chance']:>6.3f} {r['mean_percentile']:>8.3f} "
              f"{r['auroc']:>6.3f} {r['pairs']:>6} {t['seconds']:>7.1f} {t['windows_scored']:>7} {t['windows_cached']:>7}")
    print(f"total {total:.1f}s for {labels.height} responses ({total / max(labels.height, 1):.2f} s/response, "
          f"{args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "timing": timing, "seconds": total, "responses": labels.height,
                       "student": st.fingerprint, "threads": args.threads}, f, indent=2)
    loc, glo = results[LOCAL], results[GLOBAL]
    print(f"n={loc['n']} auroc_local={loc['auroc']:.3f} auroc_global={glo['auroc']:.3f} "
          f"top1_local={loc['top1']:.3f} top1_global={glo['top1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
