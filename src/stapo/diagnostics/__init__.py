"""Token-level diagnostics (STAPO's unified framework): theory, per-step metrics, rollout dumps, report.

- ``theory``: closed forms on tensors (logit-gradient norm, its bounds, first-order entropy change);
- ``metrics``: the trainer's ``diag/*`` metrics (``token_diagnostics``, ``DiagnosticsAccumulator``);
- ``dumps``: per-token parquet dumps of rollouts (``dump_rollouts``);
- ``report``: ``stapo analyze``'s Markdown + PNG report; ``check``: the theory on a real model.

Names are imported lazily (PEP 562, as the top-level package) so ``stapo --help`` stays free of torch.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "check": ["theory_check", "theory_markdown"],
    "dumps": ["dump_rollouts", "list_dumps", "read_rollouts", "rollout_path", "rollout_table"],
    "metrics": ["QUADRANTS", "DiagnosticsAccumulator", "DiagnosticsConfig", "TokenFields",
                "diagnostic_entropy_threshold", "finalize", "finalize_selection", "quadrant_codes",
                "selection_sums", "token_diagnostic_sums", "token_diagnostics",
                "token_fields"],
    "report": ["load_metrics", "top_silenced_tokens", "write_report"],
    "theory": ["LogitStats", "collision_bound_constant", "entropy_change_exact", "entropy_change_natural",
               "grad_norm_sq_bounds", "logit_grad_norm", "logit_grad_norm_sq", "logit_stats",
               "raises_entropy_paper", "surrogate_weight"],
}
_LAZY = {name: f"{__name__}.{mod}" for mod, names in _MODULES.items() for name in names}

__all__ = [
    "QUADRANTS",
    "DiagnosticsAccumulator",
    "DiagnosticsConfig",
    "LogitStats",
    "TokenFields",
    "collision_bound_constant",
    "diagnostic_entropy_threshold",
    "dump_rollouts",
    "entropy_change_exact",
    "entropy_change_natural",
    "finalize",
    "finalize_selection",
    "grad_norm_sq_bounds",
    "list_dumps",
    "load_metrics",
    "logit_grad_norm",
    "logit_grad_norm_sq",
    "logit_stats",
    "quadrant_codes",
    "raises_entropy_paper",
    "read_rollouts",
    "rollout_path",
    "rollout_table",
    "selection_sums",
    "surrogate_weight",
    "theory_check",
    "theory_markdown",
    "token_diagnostic_sums",
    "token_diagnostics",
    "token_fields",
    "top_silenced_tokens",
    "write_report",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
