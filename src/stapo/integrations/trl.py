"""STAPO inside TRL's ``GRPOTrainer``: the S2T mask (arXiv 2602.15620, Sec. 4) on TRL's own losses.

Shapes, per process and micro-batch (``per_device_train_batch_size`` rows):
    B completions, T completion tokens (right-padded)
    completion_mask, tool_mask, logprobs, entropy, silenced   [B, T]
    advantages                                                [B] (TRL) or [B, T] (subclasses)

How it hooks into TRL 1.16 (docs/trl.md has the long version):

1. Scope of τ_h. TRL generates ``steps_per_generation`` micro-batches at once and buffers them
   (``GRPOTrainer._prepare_inputs``). At the first micro-step of an optimizer step, before any
   loss of that step, a no-grad pass scores every buffered micro-batch the step will use, with the
   current weights and TRL's own fused LM head (the numbers the loss sees), and τ_h is the entropy
   quantile of the S2T candidates of all of them, gathered over all processes. When an optimizer
   step spans several generation batches (``steps_per_generation * num_iterations`` not a multiple
   of ``gradient_accumulation_steps``) the scope is each run of the step's micro-batches that share
   one generation batch (a "segment"); a warning says so at construction.
2. Mask. ``stapo.plan_minibatch`` (the planner stapo's trainer and verl's hook use) takes τ_h and
   marks the silenced tokens of each micro-batch (``plan_segment``). They enter
   TRL's loss through ``tool_mask``, the loss-only mask TRL multiplies into ``completion_mask`` (it
   never reaches attention), so every ``loss_type`` drops them from its numerator *and* from its
   token count (TRL issue 6369: a mask applied to the numerator only).
3. Global denominator. ``dapo`` / ``cispo`` / ``vespo`` divide by ``num_items_in_batch``, the loss
   tokens of the generation batch on all processes, via ``N / P · GA / spg``. It is replaced by
   ``K · spg / n`` (K = kept tokens of the segment on all processes, n = its micro-batches), so the
   normaliser becomes ``K / P · GA / n``: the segment's kept-token mean, weighted by its share n/GA
   of the optimizer step. With the default ``steps_per_generation == gradient_accumulation_steps``
   that is exactly the token mean over the step's kept tokens.
4. Per-token statistics (issue 11). Every ``_get_per_token_logps_and_entropies`` call of the run (S2T
   pre-pass, loss, TRL's old and reference log-probs) goes through ``stapo.ops.model_token_stats``
   (the model's body, then stapo's chunked head on the response positions only) when
   ``stapo_token_stats=True`` (default) and ``STAPOTrainer.token_stats_blocker`` is None; otherwise
   through TRL's fused-head forward. The choice is made once per trainer, so the pre-pass and the
   loss always score with the same code and their masks agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError("stapo.integrations.trl needs TRL: pip install 'stapo[trl]'") from err

from ..distributed import gather_variable
from ..objectives import STAPOConfig as S2TSettings
from ..objectives import TokenStats, get_objective, plan_minibatch, s2t_candidates
from ..ops import fast_path_blocker, model_token_stats

__all__ = [
    "TESTED_TRL",
    "S2TPlan",
    "STAPOConfig",
    "STAPOTrainer",
    "check_s2t_compatible",
    "check_trl_version",
    "plan_segment",
    "segment_length",
    "threshold_scope",
]

TESTED_TRL = ">=1.16,<1.17"  # keep equal to the `trl` extra in pyproject.toml

# Extra model inputs TRL's `_compute_loss` forwards to `_get_per_token_logps_and_entropies` (VLMs)
_FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


def check_trl_version(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed TRL) is in ``TESTED_TRL``; else warn and return False."""
    from packaging.specifiers import SpecifierSet

    version = trl.__version__ if version is None else version
    if SpecifierSet(TESTED_TRL).contains(version, prereleases=True):
        return True
    warnings.warn(
        f"stapo.integrations.trl is tested with trl{TESTED_TRL} (the `stapo[trl]` extra) but trl {version} is "
        "installed. STAPOTrainer relies on GRPOTrainer internals (_prepare_inputs, _buffered_inputs, tool_mask, "
        "num_items_in_batch) that can change between releases; install 'trl>=1.16,<1.17' or check the S2T "
        "metrics (s2t/masked_fraction) before trusting a run.",
        UserWarning,
        stacklevel=2,
    )
    return False


check_trl_version()


@dataclasses.dataclass
class STAPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the S2T mask of STAPO (arXiv 2602.15620).

    Four options default to None, which resolves by ``s2t_enabled``. With S2T on they give the
    paper's objective (JustRL + S2T):

    - ``epsilon_high=0.28``: clip-higher (DAPO);
    - ``delta=10.0``: TRL's two-sided clip caps ρ at δ in the unclipped term. For A < 0 that is
      verl's dual clip with c = δ (``max(min(a, c), b) = min(max(a, b), c)`` for b ≤ c); for A > 0
      it never binds because 1 + ε_high < δ. So the loss is ``stapo.policy_loss("stapo")``'s;
    - ``disable_dropout=True``: the S2T pre-pass and the loss must score the same policy;
    - ``stapo_token_stats=True``: stapo's chunked head scores the tokens.

    With ``s2t_enabled=False`` they take ``GRPOConfig``'s defaults (None, None, False) and TRL's own
    forward, so every option equals ``GRPOConfig``'s and the run is ``GRPOTrainer``'s.
    """

    s2t_enabled: bool = dataclasses.field(
        default=True,
        metadata={"help": "Apply the S2T mask (Silencing Spurious Tokens). False: GRPOConfig's defaults for every "
                          "option, and training exactly like GRPOTrainer."},
    )
    s2t_prob_threshold: float = dataclasses.field(
        default=S2TSettings.prob_threshold,
        metadata={"help": "τ_p: a valid token with advantage > 0 and current-policy probability below τ_p is an "
                          "S2T candidate."},
    )
    s2t_entropy_quantile: float = dataclasses.field(
        default=S2TSettings.entropy_quantile,
        metadata={"help": "q: candidates whose entropy is below the q-quantile of the entropies of all candidates "
                          "of the optimizer step (all processes, all accumulation micro-batches) are silenced."},
    )
    epsilon_high: float | None = dataclasses.field(
        default=None, metadata={"help": "Upper clip ε_high. Unset: 0.28 (clip-higher, STAPO/JustRL) with "
                                        "s2t_enabled, else GRPOConfig's (= epsilon)."}
    )
    delta: float | None = dataclasses.field(
        default=None,
        metadata={"help": "Two-sided clip δ; for negative advantages it equals verl's dual clip c. Unset: 10 (STAPO) "
                          "with s2t_enabled, else GRPOConfig's (off)."},
    )
    disable_dropout: bool | None = dataclasses.field(
        default=None, metadata={"help": "Disable dropout. Unset: True with s2t_enabled (the S2T pass and the loss "
                                        "must see the same policy), else GRPOConfig's False."}
    )
    stapo_token_stats: bool | None = dataclasses.field(
        default=None,
        metadata={"help": "Compute per-token log-probs and entropies with stapo.ops.model_token_stats (no [B, T, V] "
                          "logits; position ids as generate assigns them) where it applies "
                          "(STAPOTrainer.token_stats_blocker is None); False uses TRL's fused-head forward. "
                          "Unset: True with s2t_enabled, else False (exactly GRPOTrainer's numbers)."},
    )

    def __post_init__(self):
        for name, (with_s2t, without) in _S2T_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, with_s2t if self.s2t_enabled else without)
        super().__post_init__()
        for name in ("s2t_prob_threshold", "s2t_entropy_quantile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # written so NaN fails too
                raise ValueError(f"{name} must be in [0, 1], got {value}")


# option -> (its default with S2T on: the paper's, read from stapo's objective; with S2T off: GRPOConfig's)
_S2T_DEFAULTS = {
    "epsilon_high": (S2TSettings.clip_high, GRPOConfig.epsilon_high),
    "delta": (S2TSettings.clip_ratio_c, GRPOConfig.delta),
    "disable_dropout": (True, GRPOConfig.disable_dropout),
    "stapo_token_stats": (True, False),
}


def check_s2t_compatible(args) -> None:
    """Raise for a TRL option whose loss path would not apply the S2T token mask."""
    problems = []
    if getattr(args, "use_liger_loss", False):  # TRL < 1.0: Liger's fused GRPO loss takes no token mask
        problems.append("`use_liger_loss=True` (Liger's fused GRPO loss computes the loss inside its kernel "
                        "and applies no token mask)")
    if getattr(args, "use_liger_kernel", False) and (args.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
        problems.append('`liger_kernel_config={"fused_linear_cross_entropy": True}` (it replaces the forward that '
                        "returns the per-token log-probabilities and entropies S2T needs)")
    if problems:
        raise ValueError(
            "S2T (s2t_enabled=True) cannot be combined with " + "; ".join(problems)
            + ". Turn the option off, or set s2t_enabled=False to train without S2T."
        )


def threshold_scope(gradient_accumulation_steps: int, steps_per_generation: int, num_iterations: int) -> str:
    """"optimizer step" when every optimizer step lies inside one generation batch, else "segment"."""
    return "optimizer step" if (steps_per_generation * num_iterations) % gradient_accumulation_steps == 0 else "segment"


def segment_length(step: int, window_start: int, window_size: int, generate_every: int) -> int:
    """Micro-steps from ``step`` on that share both its optimizer step and its generation batch.

    ``window_start`` / ``window_size``: the optimizer step's first micro-step and its micro-batch
    count; a new generation batch starts at every multiple of ``generate_every``.
    """
    n = min(window_start + window_size - step, generate_every - step % generate_every)
    if n < 1:
        raise RuntimeError(
            f"S2T: micro-step {step} lies outside the optimizer step [{window_start}, {window_start + window_size})"
        )
    return n


class S2TPlan(NamedTuple):
    """The S2T decision for one segment: micro-steps ``start`` … ``start + len(silenced) − 1``."""

    start: int
    silenced: list[torch.Tensor]  # per micro-batch [B, T] bool, True = silenced
    num_items_in_batch: torch.Tensor  # replaces TRL's; see the module docstring, point 3
    threshold: float  # τ_h over the segment on all processes; -inf = no candidate
    valid: float  # loss tokens of the segment, all processes
    candidates: float  # S2T candidates (A > 0, p < τ_p), all processes
    silenced_count: float  # silenced tokens, all processes
    buffer: Any = None  # the TRL buffer the micro-batches came from (None in eval)


def plan_segment(stats: list[TokenStats], prob_threshold: float, entropy_quantile: float, *, start: int,
                 items_scale: float, reduce=None, device=None) -> S2TPlan:
    """The S2T plan of one segment from its micro-batches' ``stats``: ``stapo.plan_minibatch`` of the
    ``stapo`` objective (the trainer's and verl's planner), with τ_h gathered over all processes.

    ``reduce`` sums an int64 tensor over processes (None: one process). Its token-mean denominator
    (kept tokens, all processes) gives ``num_items_in_batch`` (module docstring, point 3).
    """
    reduce = reduce or (lambda counts: counts)
    spec = get_objective("stapo")
    config = spec.config(prob_threshold=prob_threshold, entropy_quantile=entropy_quantile, loss_agg_mode="token-mean")

    def all_reduce(units: int) -> int:  # int64: exact at any token count, and every backend reduces it
        return int(reduce(torch.tensor([units], dtype=torch.int64, device=device))[0])

    plan = plan_minibatch(spec, config, stats, gather=gather_variable, all_reduce=all_reduce)
    silenced = [s.response_mask.bool() & ~keep for s, keep in zip(stats, plan.keep_masks)]
    local = torch.tensor(
        [[int(s.response_mask.sum()), int(s2t_candidates(s.logprobs, s.advantages, s.response_mask,
                                                         prob_threshold).sum())] for s in stats],
        dtype=torch.int64, device=device,
    ).sum(0)  # [2]: valid, candidates on this process
    valid, candidates = reduce(local).tolist()
    # float32, as TRL's own `num_items_in_batch.clamp(min=1.0)` becomes
    num_items = torch.tensor(plan.denominator * items_scale, dtype=torch.float32, device=device)
    return S2TPlan(start, silenced, num_items, plan.config.entropy_threshold, float(valid), float(candidates),
                   float(valid - plan.denominator))


def _loss_mask(inputs: dict) -> torch.Tensor:
    """TRL's loss mask: ``completion_mask`` times ``tool_mask`` when present.  [B, T] bool."""
    mask = inputs["completion_mask"]
    return (mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]).bool()


def _with_silenced(inputs: dict, silenced: torch.Tensor, num_items_in_batch: torch.Tensor) -> dict:
    """A shallow copy of ``inputs`` whose loss mask drops ``silenced`` (the buffer is reused, never edited)."""
    keep = (~silenced).to(inputs["completion_mask"].dtype)  # [B, T]
    out = dict(inputs)
    out["tool_mask"] = keep if "tool_mask" not in inputs else inputs["tool_mask"] * keep
    out["num_items_in_batch"] = num_items_in_batch
    return out


def _no_checkpointing(model, kwargs):
    """TRL's context that turns gradient checkpointing off for a no-grad pass (a no-op if it moved)."""
    try:
        from trl.models.utils import disable_gradient_checkpointing
    except ImportError:  # pragma: no cover - a TRL outside the tested range
        return contextlib.nullcontext()
    return disable_gradient_checkpointing(model, kwargs)


class STAPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with STAPO's S2T mask. Same arguments; ``args`` must be a ``STAPOConfig``.

    Logs ``s2t/masked_fraction`` (silenced / loss tokens), ``s2t/candidates`` (count) and
    ``s2t/entropy_threshold`` (τ_h, NaN when there is no candidate) once per segment, through
    TRL's ``_metrics`` (averaged over ``logging_steps`` like TRL's own metrics).

    ``token_stats_blocker``: None when every per-token log-prob / entropy of the run comes from
    ``stapo.ops.model_token_stats``, else why TRL's own forward computes them (set at construction).
    """

    _tag_names = ("trl", "grpo", "stapo")

    def __init__(self, model, reward_funcs=None, args: STAPOConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = STAPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-STAPO")
        if not isinstance(args, STAPOConfig):
            raise TypeError(
                f"STAPOTrainer needs `args` to be a stapo.integrations.trl.STAPOConfig, got {type(args).__name__}; "
                "build it with STAPOConfig(**the same options) (s2t_enabled=False trains without S2T)"
            )
        if args.s2t_enabled:
            check_s2t_compatible(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.token_stats_blocker = self._token_stats_blocker()
        self._s2t_window_start = 0  # TRL micro-step (self._step) at which the current optimizer step began
        self._s2t_segment: S2TPlan | None = None
        scope = threshold_scope(args.gradient_accumulation_steps, args.steps_per_generation, args.num_iterations)
        if args.s2t_enabled and scope != "optimizer step":
            warnings.warn(
                f"S2T: steps_per_generation × num_iterations = {args.steps_per_generation * args.num_iterations} is "
                f"not a multiple of gradient_accumulation_steps = {args.gradient_accumulation_steps}, so an optimizer "
                "step spans several generation batches; the entropy threshold is taken over each run of the step's "
                "micro-batches that share one generation batch (on all processes), not over the whole step. Make "
                "steps_per_generation a multiple of gradient_accumulation_steps for whole-step scope.",
                UserWarning,
                stacklevel=2,
            )

    # --- per-token statistics: stapo.ops.model_token_stats or TRL's fused head ---------------------

    def _token_stats_blocker(self) -> str | None:
        """Why this trainer cannot use ``model_token_stats`` (None: it does). Fixed for the whole run, so
        the S2T pre-pass and the loss never score the same tokens with different code."""
        from accelerate.utils import DistributedType

        if not self.args.stapo_token_stats:
            return "stapo_token_stats=False"
        if self._entropy_bonus_enabled:  # TRL's entropy bonus differentiates the entropy
            return "the entropy bonus (entropy_coef / adaptive entropy) needs the entropy's gradient"
        if self.aux_loss_enabled:
            return "the MoE load-balancing loss comes from the model's own forward"
        if self._is_vlm:
            return "vision-language inputs go through the model's own forward"
        if self.accelerator.distributed_type != DistributedType.NO:
            # DDP's gradient all-reduce, FSDP's and DeepSpeed's parameter gathering run in the wrapper's forward
            return f"distributed type {self.accelerator.distributed_type}: the wrapper's forward must run"
        return fast_path_blocker(self.model)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **model_inputs):
        """TRL's contract: ([B, K] log-probs, [B, K] entropies or None, aux loss or None) of the last
        K = ``logits_to_keep`` tokens at ``self.temperature``, zero where ``attention_mask`` is 0, computed
        ``batch_size`` rows at a time. Through ``model_token_stats`` unless ``token_stats_blocker`` says
        otherwise, or the call carries what only the model's forward handles (images, router logits)."""
        # single process here (see _token_stats_blocker): unwrapping drops only torch.compile's wrapper
        inner = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        start = input_ids.shape[1] - logits_to_keep  # P: first completion column
        if (self.token_stats_blocker is not None or compute_aux_loss or start < 1
                or any(v is not None for v in model_inputs.values()) or fast_path_blocker(inner) is not None):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **model_inputs)
        rows = batch_size or input_ids.shape[0]  # TRL chunks rows to bound the activation peak
        logps, entropies = [], []
        with self.accelerator.autocast():
            for ids, mask in zip(input_ids.split(rows), attention_mask.split(rows)):
                out = model_token_stats(inner, ids, mask, start, temperature=self.temperature,
                                        with_entropy=compute_entropy)  # [b, K] each, fp32
                pad = mask[:, start:] == 0  # TRL's labels are -100 there and its outputs 0
                logps.append(out.logprobs.masked_fill(pad, 0.0))
                if compute_entropy:
                    entropies.append(out.entropy.masked_fill(pad, 0.0))
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    # --- the optimizer-step window -----------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The Trainer loop sets sync_gradients before each micro-step: True on the last of an optimizer step
        ends_window = self.accelerator.sync_gradients
        loss = super().training_step(model, inputs, num_items_in_batch)  # TRL increments self._step here
        if ends_window:
            self._s2t_window_start = self._step
        return loss

    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)  # generates and buffers when due
        if not self.args.s2t_enabled:
            return inputs
        if not self.model.training:  # eval: one unbuffered batch, TRL's normaliser is N / P
            plan = self._s2t_plan([inputs], start=self._step, items_scale=1.0)
            self._s2t_log("eval", plan)
            return _with_silenced(inputs, plan.silenced[0], plan.num_items_in_batch)
        plan = self._s2t_segment
        if (plan is None or plan.buffer is not self._buffered_inputs
                or not plan.start <= self._step < plan.start + len(plan.silenced)):
            plan = self._s2t_segment = self._s2t_next_segment()
            self._s2t_log("train", plan)
        return _with_silenced(inputs, plan.silenced[self._step - plan.start], plan.num_items_in_batch)

    def _s2t_next_segment(self) -> S2TPlan:
        """Plan the micro-steps from ``self._step`` that share its optimizer step and generation batch."""
        spg = self.args.steps_per_generation
        n = segment_length(self._step, self._s2t_window_start, self.current_gradient_accumulation_steps,
                           spg * self.num_iterations)
        # the buffer index of micro-step s is s % spg (GRPOTrainer._prepare_inputs)
        batches = [self._buffered_inputs[(self._step + i) % spg] for i in range(n)]
        plan = self._s2t_plan(batches, start=self._step, items_scale=spg / n)
        return plan._replace(buffer=self._buffered_inputs)

    # --- statistics, threshold and mask --------------------------------------------------------------

    def _s2t_token_stats(self, inputs: dict) -> TokenStats:
        """No-grad log-probs and entropies [B, T] of one micro-batch, exactly as TRL's loss computes them."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)  # [B, P + T]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)  # [B, P + T]
        extra = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}
        with torch.no_grad(), _no_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            # the loss's own scoring path (stapo's chunked head or TRL's fused head): the same numbers
            logprobs, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True, **extra
            )
        return TokenStats(logprobs, entropy, inputs["advantages"], _loss_mask(inputs))

    def _s2t_plan(self, batches: list[dict], *, start: int, items_scale: float) -> S2TPlan:
        """τ_h over ``batches`` on all processes, each batch's silenced tokens, and the global counts."""
        stats = [self._s2t_token_stats(b) for b in batches]
        return plan_segment(stats, self.args.s2t_prob_threshold, self.args.s2t_entropy_quantile, start=start,
                            items_scale=items_scale, reduce=self._s2t_reduce, device=self.accelerator.device)

    def _s2t_reduce(self, counts: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(counts, reduction="sum")

    def _s2t_log(self, mode: str, plan: S2TPlan) -> None:
        metrics = self._metrics[mode]
        metrics["s2t/masked_fraction"].append(plan.silenced_count / max(plan.valid, 1.0))
        metrics["s2t/candidates"].append(plan.candidates)
        # -inf (no candidate) is logged as NaN, which TRL's `log` leaves out of the average
        metrics["s2t/entropy_threshold"].append(plan.threshold if math.isfinite(plan.threshold) else float("nan"))
