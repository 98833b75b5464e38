"""Rollout reuse with Dynamic Gradient Gating (DGG, arXiv 2605.19425); see docs/dgg.md.

- ``zscore``: the pure test statistic (sliding window, z-score);
- ``head_grad``: g = ‖∂L/∂W_head‖², the output projection's gradient only (tied or not, DDP, FSDP2);
- ``gate``: the ``ReuseGate`` that ``update_policy`` drives, and ``make_gate(cfg.reuse, model)``.
"""

from .gate import FIRST_GATED_PASS, GATES, ReuseGate, make_gate, should_veto
from .head_grad import HeadGradProbe, head_edges, is_tied
from .zscore import STATISTICS, SlidingZScore, zscore

__all__ = ["FIRST_GATED_PASS", "GATES", "STATISTICS", "HeadGradProbe", "ReuseGate", "SlidingZScore", "head_edges",
           "is_tied", "make_gate", "should_veto", "zscore"]
