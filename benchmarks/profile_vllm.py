"""Where the time goes: vLLM (per-window requests) and the engine on the same windows, each under
`torch.profiler`, ops grouped into GEMM / attention / elementwise / other.

    .venv-vllm/bin/python -m benchmarks.profile_vllm [--prompts 1] [--teachers ...] [--rows 14]

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by `vllm_for_bench`), so its model ops
land in this process's profile. The README's vLLM section quotes this script's tables: they are
what `lalp_resources/engine/cpu_kernels.py` was built from.
"""

from __future__ import annotations

import sys

from benchmarks import benchmark as B

GROUPS = (
    ("gemm", ("mm", "addmm", "linear", "onednn_mm", "_linear_pointwise", "matmul", "bmm", "gemm")),
    ("attention", ("attention", "attn", "sdpa", "flash", "paged")),
    ("norm/act fused", ("rms_norm", "silu_and_mul", "fused_add_rms", "rotary")),
    ("elementwise", ("mul", "add", "silu", "exp", "sub", "neg", "cat", "pow", "rsqrt", "div", "amax", "sum", "mean",
                     "log_softmax", "copy", "index", "gather", "where", "clamp", "tanh")),
)


def group(name: str) -> str:
    n = name.lower().split("::")[-1]
    for g, keys in GROUPS:
        if any(k in n for k in keys):
            return g
    return "other"


def table(prof, title: str, wall: float, rows: int) -> None:
    ev = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    by = {}
    for e in ev:
        by[group(e.key)] = by.get(group(e.key), 0.0) + e.self_cpu_time_total / 1e6
    print(f"\n{title}: wall {wall:.2f}s, profiled op CPU time {total:.2f}s")
    for g, s in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<16} {s:7.2f}s {s / total:6.1%}")
    print(f"  top ops:")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.key[:60]:<60} {e.self_cpu_time_total / 1e6:7.2f}s {e.count:>6} calls")


def main(argv=None) -> int:
    import argparse

    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--teachers", nargs="+", default=["gpt-4o-2024-08-06", "claude-3-5-sonnet-20241022",
                                                      "Qwen2.5-72B-Instruct", "Meta-Llama-3.1-8B-Instruct"])
    ap.add_argument("--rows", type=int, default=12, help="top ops listed per contender")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    args = B.parse_args(["--prompts", str(a.prompts), "--teachers", *a.teachers])
    st = B.load_bench_student(args)
    rows, _, source, _, _ = B.load_inputs(args)
    items = B.make_items(rows, st.tokenizer)
    llm = B.vllm_for_bench(st, a.threads)
    B._warmup(st.model, st.tokenizer, args.window, args.template)
    B.run_vllm(llm, st.tokenizer, items[:1], args.window, args.template)  # vLLM's first-call costs
    for name, fn in (("vllm_window", lambda: B.run_vllm(llm, st.tokenizer, items, args.window, args.template)),
                     ("engine", lambda: B.run_engine(st.model, st.tokenizer, items, args.window, args.template)),
                     ("engine, LALP_CPU_KERNELS=0",
                      lambda: B.run_engine(st.model, st.tokenizer, items, args.window, args.template, cpu_kernels=False))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r = fn()
        fwd = r.extra.get("stats", {}).get("tokens_forwarded", "?") if isinstance(r.extra, dict) else "?"
        table(prof, f"{name} ({fwd} token-forwards)", r.seconds, a.rows)
    print(f"\ndata: {source}; {len(items)} responses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
