"""The DGG test statistic: a z-score of the lm_head gradient against a sliding window.

Notation (DGG, arXiv 2605.19425, Sec. 3; the paper does not publish its exact
normalisation, so every choice below is ours and configurable through ``reuse:``):

    g_t   = ‖∇_{W_head} L_t‖²            squared L2 norm of the lm_head weight gradient at
                                          optimizer step t (pre-clip, global over ranks)
    x_t   = g_t                           statistic "norm"
          = g_t − g_{t'}                  statistic "increment": t' the last *accepted* step
    h     = (x_{t−W}, …, x_{t−1})         the last W accepted values, oldest first
    z_t   = (x_t − mean(h)) / (std(h) + eps)

Choices and why:
- leave-one-out: x_t is scored against the window *before* it enters, so a spike cannot
  dampen its own score (with x_t inside, z is bounded by (W−1)/√W ≈ 2.5 for W = 8);
- std with Bessel's correction (n − 1): an unbiased variance for a window of 8;
- only accepted steps enter the window: a vetoed spike would inflate std and mask the
  next one. First passes are never vetoed and always enter, so a genuine level shift of
  g (e.g. as the policy sharpens) is absorbed within W steps;
- eps is absolute (g has units of gradient²), the conventional 1e-8: it only matters for
  a (near-)constant window, where it keeps z finite.

Everything here is plain Python floats: the state is a JSON list (checkpointed with the
trainer state, so a resumed run scores exactly as an uninterrupted one).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

STATISTICS = ("norm", "increment")


def zscore(x: float, history: Sequence[float], eps: float) -> float:
    """(x − mean(h)) / (std(h) + eps) with the sample std (n − 1); ``h`` needs ≥ 2 values."""
    n = len(history)
    if n < 2:
        raise ValueError(f"history: need at least 2 values for a standard deviation, got {n}")
    mean = math.fsum(history) / n
    var = math.fsum((v - mean) ** 2 for v in history) / (n - 1)
    return (x - mean) / (math.sqrt(var) + eps)


class SlidingZScore:
    """A window of the last ``window`` accepted statistics and the z-score of a new one.

    ``score(g)`` is pure (it reads the window); ``push(g)`` records an accepted step.
    """

    def __init__(self, window: int, statistic: str = "norm", eps: float = 1e-8):
        if window < 2:
            raise ValueError(f"window: need >= 2 values for a standard deviation, got {window}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic: must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        if not eps > 0:
            raise ValueError(f"eps: must be > 0, got {eps}")
        self.window, self.statistic, self.eps = int(window), statistic, float(eps)
        self.values: deque[float] = deque(maxlen=self.window)  # x of accepted steps, oldest first
        self.last_g: float | None = None  # g of the last accepted step ("increment")

    def value(self, g: float) -> float | None:
        """x for a step with squared norm ``g``: g, or g − g_last (None before the first step)."""
        if self.statistic == "norm":
            return float(g)
        return None if self.last_g is None else float(g) - self.last_g

    @property
    def full(self) -> bool:
        return len(self.values) == self.window

    def score(self, g: float) -> float | None:
        """z of ``g`` against the window; None until the window holds ``window`` values."""
        x = self.value(g)
        if x is None or not self.full:
            return None
        return zscore(x, self.values, self.eps)

    def push(self, g: float) -> None:
        x = self.value(g)
        if x is not None:
            self.values.append(x)
        self.last_g = float(g)

    def state_dict(self) -> dict:
        return {"values": list(self.values), "last_g": self.last_g}

    def load_state_dict(self, state: dict) -> None:
        values = [float(v) for v in state["values"]]
        if len(values) > self.window:
            raise ValueError(f"saved window holds {len(values)} values but reuse.window = {self.window}")
        self.values = deque(values, maxlen=self.window)
        self.last_g = None if state["last_g"] is None else float(state["last_g"])
