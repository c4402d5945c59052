"""CPU kernels for the engine's forward, taken from what vLLM does on CPU.

A profile of vLLM's CPU backend against ours (README, "Large students: the vLLM backend") showed
where it did more per FLOP than a transformers forward: oneDNN GEMMs on weights reordered once
into the kernel's blocked layout (`onednn_mm`), the MLP's SiLU and product fused into its GEMMs
(`silu_and_mul`) and a one-pass RMSNorm. In a plain forward those elementwise passes were ~15% of
engine time and the GEMMs ran on MKL with the weight re-laid out per call. `FastCPU` brings the
same three things to the engine with torch's own oneDNN ops, no new dependency:

- every `nn.Linear` runs `mkldnn._linear_pointwise` on a weight packed once;
- a gated-SiLU MLP (`gate_proj`, `up_proj`, `down_proj`) runs as two fused GEMMs,
  silu(x Wg) computed in the gate GEMM's epilogue and (x Wu) * that in the up GEMM's;
- an RMSNorm runs `torch.nn.functional.rms_norm`.

Each replacement is checked against the module's own forward on a random probe when it is
built, and left out where they differ (an MLP with another activation, Gemma's (1 + w) norm):
the engine stays exact to the definition, within float32 rounding of a different summation
order. The replacements are active only inside `FastCPU.active()`, around the engine's model
work, so the reference implementation, the tests' plain forwards and other callers of the same
model run it exactly as transformers does. Cost: one packed copy of the linear weights (the
student's size again in memory); `LALP_CPU_KERNELS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("lalp.engine")

PROBE_ROWS = 8
PROBE_TOL = 1e-4  # relative to the output's scale: rounding of another summation order, not a different function


def supported(model) -> tuple[bool, str]:
    """Whether the fast CPU path can run this model: float32 on CPU with torch's oneDNN."""
    p = next(model.parameters(), None)
    if p is None:
        return False, "the model has no parameters"
    if p.device.type != "cpu":
        return False, f"the model is on {p.device.type}"
    if p.dtype != torch.float32:
        return False, f"the model is {p.dtype} (the packed kernels here are float32)"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False, "this torch build has no oneDNN linear"
    return True, ""


def _pack(weight: torch.Tensor, rows_hint: int = 1024) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _unflat(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.reshape(*like.shape[:-1], y.shape[-1])


def _linear_forward(packed, bias):
    def forward(x):
        return _unflat(torch.ops.mkldnn._linear_pointwise(_flat(x), packed, bias, "none", [], ""), x)
    return forward


def _mlp_forward(gate, up, down):
    (wg, bg), (wu, bu), (wd, bd) = gate, up, down

    def forward(x):
        h = _flat(x)
        g = torch.ops.mkldnn._linear_pointwise(h, wg, bg, "swish", [], "")     # silu(x Wg + bg)
        gu = torch.ops.mkldnn._linear_pointwise.binary(h, g, wu, bu, "mul")   # (x Wu + bu) * silu(...)
        return _unflat(torch.ops.mkldnn._linear_pointwise(gu, wd, bd, "none", [], ""), x)
    return forward


def _rms_forward(module):
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)) or 1e-6)
    weight = module.weight

    def forward(x):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return forward


def _is_rmsnorm(m) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and m.weight.dim() == 1


def _is_gated_mlp(m) -> bool:
    return all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
        and hasattr(m, "act_fn")


def _agrees(original, fast, in_features: int, dtype) -> bool:
    """The replacement computes the module's function (on a random probe)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, PROBE_ROWS, in_features, generator=g, dtype=dtype)
    with torch.no_grad():
        want, got = original(x), fast(x)
    if want.shape != got.shape:
        return False
    scale = float(want.abs().max()) or 1.0
    return float((want - got).abs().max()) <= PROBE_TOL * scale


class FastCPU:
    """The replacement forwards for one model, built (and packed) once; `active()` installs them."""

    def __init__(self, model):
        self.forwards: dict[torch.nn.Module, object] = {}
        self.skipped: list[str] = []
        dtype = next(model.parameters()).dtype
        inside_mlp: set[int] = set()
        with torch.no_grad():
            for name, m in model.named_modules():
                if _is_gated_mlp(m):
                    parts = [(_pack(p.weight), p.bias) for p in (m.gate_proj, m.up_proj, m.down_proj)]
                    fast = _mlp_forward(*parts)
                    if _agrees(m.forward, fast, m.gate_proj.in_features, dtype):
                        self.forwards[m] = fast
                        inside_mlp.update(id(p) for p in (m.gate_proj, m.up_proj, m.down_proj))
                    else:
                        self.skipped.append(f"{name} (not a SiLU-gated MLP)")
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and id(m) not in inside_mlp:
                    self.forwards[m] = _linear_forward(_pack(m.weight), m.bias)
                elif _is_rmsnorm(m):
                    fast = _rms_forward(m)
                    if _agrees(m.forward, fast, m.weight.shape[0], dtype):
                        self.forwards[m] = fast
                    else:
                        self.skipped.append(f"{name} (another norm than x * rsqrt(mean(x^2) + eps) * w)")
        if self.skipped:
            log.info("fast CPU kernels: %d module(s) left as they are: %s", len(self.skipped),
                     ", ".join(self.skipped[:3]) + (" ..." if len(self.skipped) > 3 else ""))

    @property
    def counts(self) -> dict[str, int]:
        kinds = {"linear": 0, "mlp": 0, "rmsnorm": 0}
        for m in self.forwards:
            kinds["linear" if isinstance(m, torch.nn.Linear) else "mlp" if _is_gated_mlp(m) else "rmsnorm"] += 1
        return kinds

    @contextlib.contextmanager
    def active(self):
        """The replacements as the modules' forwards for the duration (an instance attribute
        shadows the class's `forward`; removing it restores the module)."""
        had = {m: m.__dict__["forward"] for m in self.forwards if "forward" in m.__dict__}
        try:
            for m, f in self.forwards.items():
                m.forward = f
            yield self
        finally:
            for m in self.forwards:
                if m in had:
                    m.forward = had[m]
                else:
                    m.__dict__.pop("forward", None)


def fast_cpu(model) -> FastCPU | None:
    """The model's `FastCPU`, built once per model object (None where `supported` says no)."""
    ok, why = supported(model)
    if not ok:
        log.debug("fast CPU kernels: not used (%s)", why)
        return None
    fast = getattr(model, "_lalp_fast_cpu", None)
    if fast is None:
        fast = FastCPU(model)
        model._lalp_fast_cpu = fast
    return fast
