"""Rollout reuse: K passes over each rollout batch, and DGG's veto on each optimizer step.

DGG (Dynamic Gradient Gating, arXiv 2605.19425): reuse a rollout batch for up to K full
passes; after backward and before ``optimizer.step()`` take g = ‖∂L/∂W_head‖² (pre-clip,
``HeadGradProbe``), score it against a sliding window (``SlidingZScore``) and, on the
second pass or later, veto the step when z > τ: the gradients are dropped, Adam's
moments are untouched, and the batch is not reused further (the next RL step draws fresh
rollouts). Reused passes keep the rollout-time ``old_logprobs``; the ratio and its clip
handle the staleness, as PPO epochs do.

``update_policy`` drives a gate through this protocol (every rank calls every method):

    for each optimizer step:
        for each micro-batch: gate.track(loss); loss.backward()
        gate.measure()                       # before clip_grad_norm_
        clip; if finite: vetoed = gate.veto(pass_index)   # False: the step is taken
    gate.pop_metrics()                       # once per rollout batch

Modes: "fixed" runs the K passes and only *observes* (g and z are logged, nothing is
vetoed: the naive-reuse baseline that shows what DGG prevents); "dgg" also vetoes.
The window persists across rollout batches for the whole run — one window of recent
optimizer steps, fed by every accepted step — and is checkpointed (``state_dict``).
"""

from __future__ import annotations

import math

from ..distributed import all_reduce_sum
from .head_grad import HeadGradProbe, head_trainable
from .zscore import SlidingZScore

GATES = ("none", "fixed", "dgg")
FIRST_GATED_PASS = 2  # pass 1 is on-policy data: never vetoed (DGG step 3)


def should_veto(z: float | None, pass_number: int, threshold: float) -> bool:
    """DGG step 3-4: veto when the window is full (z defined), the pass is the 2nd or later and z > τ."""
    return z is not None and pass_number >= FIRST_GATED_PASS and z > threshold


class ReuseGate:
    """K passes over a rollout batch; with ``enforce`` (dgg) a z-score veto on pass >= 2.

    ``probe`` measures g (None only for an observing gate on a frozen head); ``window`` holds the
    run-long history of accepted steps and is the gate's whole persistent state (``state_dict``).
    """

    def __init__(self, probe: HeadGradProbe | None, window: SlidingZScore, *, max_passes: int,
                 threshold: float, enforce: bool):
        if probe is None and enforce:
            raise ValueError("a vetoing gate needs a probe of the lm_head gradient")
        self.probe, self.window = probe, window
        self.max_passes, self.threshold, self.enforce = int(max_passes), float(threshold), enforce
        self._g = math.nan
        self._reset_metrics()

    def _reset_metrics(self) -> None:
        self._gs: list[float] = []  # g of every finite step of this batch (vetoed ones included)
        self._zs: list[float] = []  # z of the steps the gate tested (pass >= 2, window full)
        self._triggers, self._passes = 0, 0

    def track(self, loss) -> None:
        if self.probe is not None:
            self.probe.track(loss)

    def measure(self) -> float:
        """g of the step whose gradients were just accumulated (pre-clip); NaN without a probe."""
        self._g = math.nan if self.probe is None else self.probe.squared_norm()
        return self._g

    def veto(self, pass_index: int) -> bool:
        """Decide on the measured step (0-based ``pass_index``); identical on every rank.

        A step that goes ahead enters the window; a vetoed one does not.
        """
        g, pass_number = self._g, pass_index + 1
        if math.isnan(g):  # "fixed" with a frozen head: nothing to observe
            self._passes = max(self._passes, pass_number)
            return False
        z = self.window.score(g)
        if z is not None and pass_number >= FIRST_GATED_PASS:
            self._zs.append(z)
        vetoed = self.enforce and should_veto(z, pass_number, self.threshold)
        # g is already global, so every rank agrees; the sum makes that a guarantee
        vetoed = all_reduce_sum(float(vetoed)) > 0
        self._gs.append(g)
        if vetoed:
            self._triggers += 1
        else:
            self.window.push(g)
            self._passes = max(self._passes, pass_number)
        return vetoed

    def pop_metrics(self) -> dict[str, float]:
        """Per rollout batch: passes that took a step, vetoes, mean g, and the largest tested z."""
        out = {"reuse/passes": self._passes, "reuse/gate_triggers": self._triggers}
        if self._gs:
            out["reuse/lm_head_grad_sq"] = math.fsum(self._gs) / len(self._gs)
        if self._zs:
            out["reuse/z"] = max(self._zs)
        self._reset_metrics()
        return out

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.window.load_state_dict(state["window"])


def make_gate(reuse_cfg, model) -> ReuseGate | None:
    """The gate ``reuse:`` asks for (None for "none": one pass, the plain trainer); call after wrapping."""
    if reuse_cfg.gate not in GATES:
        raise ValueError(f"reuse.gate: must be one of {', '.join(GATES)}, got {reuse_cfg.gate!r}")
    if reuse_cfg.gate == "none":
        return None
    # "fixed" only observes g, so a frozen head (LoRA) just means nothing to log
    observe = reuse_cfg.gate == "dgg" or head_trainable(model)
    return ReuseGate(
        HeadGradProbe(model) if observe else None,
        SlidingZScore(reuse_cfg.window, reuse_cfg.statistic, reuse_cfg.eps),
        max_passes=reuse_cfg.max_reuse,
        threshold=reuse_cfg.z_threshold,
        enforce=reuse_cfg.gate == "dgg",
    )
