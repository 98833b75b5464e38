"""The phases of one RL step, each a named function the loop calls in the order of Algorithm 1.

Each phase returns what it produced (a new ``RolloutBatch``, ``RolloutStats``, a ``PolicyUpdate``)
and leaves its inputs untouched. Shapes: P prompts a step, G samples each, B = P·G rows,
T response tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch

from ..advantages import group_advantages
from ..batch import RolloutBatch, RolloutStats
from ..data.prompts import tokenize_prompt
from ..distributed import LOCAL, DistContext, all_reduce_sum, gather_variable
from ..objectives import TokenStats
from ..objectives.corrections import apply_tis, rollout_mismatch
from ..objectives.training import MinibatchPlan, TrainingObjective
from ..rollout import SamplingConfig, collate_rollouts

# metrics that add up over micro-batches instead of averaging
SUM_METRICS = {"s2t/candidates", "s2t/silenced", "clip_cov/detached", "kl_cov/penalised"}


class ProblemSampler:
    """Deterministic shuffled passes over the training problems; its cursor is checkpointed."""

    def __init__(self, problems: list, seed: int, shuffle: bool = True):
        if not problems:
            raise ValueError("the training set is empty")
        self.problems, self.seed, self.shuffle = problems, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.problems)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.problems), generator=g).tolist()

    def next(self, k: int) -> list:
        out = []
        while len(out) < k:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self.problems[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


# --- 2. generate -------------------------------------------------------------------------------

def sampling_config(rollout_cfg, n: int | None = None, seed: int | None = None) -> SamplingConfig:
    return SamplingConfig(
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p,
        top_k=0,
        max_new_tokens=rollout_cfg.max_new_tokens,
        min_new_tokens=rollout_cfg.min_new_tokens,
        n=rollout_cfg.n if n is None else n,
        seed=seed,
    )


def generate_rollouts(generator, tokenizer, problems: list, prompts: list[str], rollout_cfg) -> RolloutBatch:
    """G responses for each prompt string, collated into a ``RolloutBatch``."""
    prompt_ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    generations = generator.generate(prompt_ids, sampling_config(rollout_cfg))
    return collate_rollouts(
        problems, prompt_ids, generations, tokenizer.pad_token_id, mask_truncated=rollout_cfg.mask_truncated
    )


# --- 3. reward ---------------------------------------------------------------------------------

def score_rollouts(pool, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, float]]:
    """(the batch with ``rewards`` [B] from the reward pool, reward metrics)."""
    golds = [p.answer for p in batch.problems]
    scores = pool.score_batch(batch.response_texts, golds, lengths=batch.response_lengths.tolist())
    rewards = torch.tensor(scores, dtype=torch.float32)
    metrics = {"reward/mean": float(rewards.mean())}
    metrics.update(pool.pop_metrics())
    return dataclasses.replace(batch, rewards=rewards), metrics


def split_constant_groups(batch: RolloutBatch, group_size: int) -> tuple[RolloutBatch, RolloutBatch]:
    """(groups with mixed rewards, groups whose rewards are all equal): DAPO dynamic sampling."""
    r = batch.rewards.view(-1, group_size)
    mixed = (r != r[:, :1]).any(dim=1)
    rows = torch.arange(len(batch)).view(-1, group_size)
    return batch.select(rows[mixed].view(-1)), batch.select(rows[~mixed].view(-1))


# --- 4. advantages -----------------------------------------------------------------------------

def attach_advantages(batch: RolloutBatch, group_size: int, method: str) -> RolloutBatch:
    """The batch with its group-relative ``advantages`` [B]."""
    return dataclasses.replace(batch, advantages=group_advantages(batch.rewards, group_size, method))


# --- 5. per-token statistics of a policy -------------------------------------------------------

def policy_stats(model, batch: RolloutBatch, temperature: float, *, with_entropy: bool = True,
                 with_collision: bool = False, fast: bool = True):
    """Log-prob [B, T] (with grad if enabled) and detached entropy/collision [B, T] of the responses."""
    from ..ops import model_token_stats

    return model_token_stats(
        model,
        batch.input_ids,
        batch.attention_mask,
        batch.prompt_ids.shape[1],
        temperature=temperature,
        with_entropy=with_entropy,
        with_collision=with_collision,
        fast=fast,
    )


@torch.no_grad()
def compute_old_logprobs(model, batch: RolloutBatch, temperature: float, micro_batch_size: int,
                         device, with_collision: bool = True, ref_model=None) -> RolloutStats:
    """The rollout policy's log-probs, entropy (and collision, and the reference's log-probs) at the
    rollout temperature: a separate no-grad pass; ``batch.with_rollout_stats`` attaches them."""
    lps, ents, cols, refs = [], [], [], []
    for micro in batch.split(micro_batch_size):
        micro = micro.to(device)
        out = policy_stats(model, micro, temperature, with_collision=with_collision)
        lps.append(out.logprobs.float().cpu())
        ents.append(out.entropy.float().cpu())
        if with_collision:
            cols.append(out.collision.float().cpu())
        if ref_model is not None:
            refs.append(policy_stats(ref_model, micro, temperature, with_entropy=False).logprobs.float().cpu())
    return RolloutStats(torch.cat(lps), torch.cat(ents), torch.cat(cols) if cols else None,
                        torch.cat(refs) if refs else None)


def rollout_engine_mismatch(batch: RolloutBatch) -> dict[str, float]:
    """|log π_engine − log π_train| when the engine reports log-probs (vLLM); a metric only."""
    if batch.rollout_logprobs is None:
        return {}
    return {k: float(v) for k, v in rollout_mismatch(batch.old_logprobs, batch.rollout_logprobs,
                                                    batch.response_mask).items()}


def correct_rollout_engine(batch: RolloutBatch, tis_cap: float | None) -> tuple[RolloutBatch, dict[str, float]]:
    """Truncated importance sampling (``rollout.tis_cap``): advantages × min(π_train / π_engine, C).

    Returns a new batch with [B, T] advantages (the input is not modified) and the TIS metrics.
    """
    if tis_cap is None or batch.rollout_logprobs is None:
        return batch, {}
    advantages, metrics = apply_tis(batch, tis_cap)
    return dataclasses.replace(batch, advantages=advantages), metrics


def old_stats_from_update(cfg, batch: RolloutBatch, *, objective: TrainingObjective, gate=None,
                          ref_model=None) -> bool:
    """True when ``update_policy``'s first forward can supply the rollout policy's statistics
    (``PolicyUpdate.rollout_stats``) itself, so ``compute_old_logprobs`` would be a redundant forward.

    That holds when the step is one mini-batch (M = P: every row is first scored by the rollout
    policy itself, so ρ = 1 exactly, as TRL's GRPOTrainer with num_iterations = 1 skips its old
    log-prob pass), nothing is needed before the loss (no mini-batch-wide statistic or
    statistics-dependent loss mask, no engine log-probs to correct against: vLLM TIS), no
    reference or teacher pass shares the no-grad sweep, and no reuse gate (benchmark 3, issue 11).
    ``objective``: the run's, built once by the loop.
    """
    return (cfg.optim.mini_batch_prompts == cfg.rollout.prompts_per_step
            and not objective.needs_statistics
            and batch.rollout_logprobs is None and gate is None and ref_model is None)


# --- 6. update ---------------------------------------------------------------------------------

class MetricMean:
    """Weighted means (and plain sums for counts) of metric dicts over micro-batches."""

    def __init__(self):
        self.total, self.weight = defaultdict(float), defaultdict(float)

    def add(self, metrics: dict, weight: float = 1.0) -> None:
        for k, v in metrics.items():
            v = float(v)
            if math.isnan(v):
                continue
            if k in SUM_METRICS:
                self.total[k] += v
                self.weight[k] = 1.0
            else:
                self.total[k] += v * weight
                self.weight[k] += weight

    def result(self) -> dict[str, float]:
        return {k: self.total[k] / self.weight[k] for k in self.total if self.weight[k] > 0}


@dataclasses.dataclass(frozen=True)
class PolicyUpdate:
    """What ``update_policy`` produced."""

    metrics: dict[str, float]
    # the rollout policy's statistics when the update's first forward scored it (the batch had no
    # ``old_logprobs``: ``old_stats_from_update``), else None
    rollout_stats: RolloutStats | None
    # [B, T] bool: the tokens the objective acted on in the first sweep (S2T's silenced, 20-Entropy's
    # kept, Clip-Cov's detached, KL-Cov's penalised), for the select/* diagnostics; None if it selects none
    selected: torch.Tensor | None


def update_policy(model, optimizer, batch: RolloutBatch, cfg, device, *, params_fresh: bool = True,
                  ctx: DistContext = LOCAL, gate=None, collision: bool = False,
                  objective: TrainingObjective) -> PolicyUpdate:
    """``ppo_epochs`` sweeps of optimizer mini-batches of M prompts over ``batch`` (Algorithm 1, lines 6-9).

    Per mini-batch: (1) plan: the objective's mini-batch-wide statistics, each micro-batch's keep
    mask (computed once) and the global denominator; (2) accumulate gradients over micro-batches,
    each loss divided by that denominator; (3) clip; (4) step, skipped when the loss or the
    gradient norm is not finite, or when the reuse gate vetoes it.

    ``objective``: built once per run, by the loop. Its statistics
    come from the rollout policy (``old_logprobs``) while the policy is still that one
    (the first mini-batch of a step) or under ``objective.statistics: rollout``; otherwise, for
    objectives whose mask reads a policy's statistics (S2T, 20-Entropy), from a no-grad pass of the
    current policy. Objectives without such a mask run no extra pass. ``params_fresh=False`` is for
    a caller that updates on ``batch`` again after the policy moved; the trainer's batches are fresh.
    If ``old_logprobs`` is None (``old_stats_from_update``), the first mini-batch's own forward scores
    the rollout policy (log-probs, entropy and, with ``collision``, collision): later sweeps read them,
    and they are returned as ``PolicyUpdate.rollout_stats``. ``batch`` itself is never modified.

    Under DDP / FSDP2 ``batch`` is this rank's share of the global batch: thresholds are taken over
    the gathered statistics of all ranks and the loss is divided by the global unit count, so the
    update equals the single-process one.

    ``gate`` (``stapo.reuse.ReuseGate``, from ``reuse:``; None = one pass): the batch is reused for
    ``gate.max_passes`` passes of ``ppo_epochs`` sweeps each, with the rollout-time ``old_logprobs``.
    The gate hooks each micro-batch loss (``track``), measures the pre-clip lm_head gradient
    (``measure``) and may veto a finite step (``veto``): the step is skipped (gradients dropped,
    Adam untouched) and the batch is not reused further.
    """
    rows = cfg.optim.mini_batch_prompts // ctx.world_size * cfg.rollout.n  # this rank's share of M
    fill = params_fresh and batch.old_logprobs is None  # the update scores the rollout policy itself
    if fill and (len(batch) > rows or objective.needs_statistics):
        raise ValueError(f"update_policy: batch.old_logprobs is None, but objective {objective.name!r} with "
                         f"{len(batch)} rows in mini-batches of {rows} needs them before the loss "
                         "(old_stats_from_update); run compute_old_logprobs first")
    metrics, outcomes = MetricMean(), {"stepped": 0, "nonfinite": 0, "vetoed": 0}
    selected, rollout_stats = [], None
    sweeps = (gate.max_passes if gate is not None else 1) * cfg.optim.ppo_epochs  # DGG reuses K passes
    for sweep in range(sweeps):
        for mb in batch.split(rows):
            micros = [m.to(device) for m in mb.split(cfg.optim.micro_batch_size)]
            # (1) plan the mini-batch: statistics -> thresholds, keep masks, global denominator
            plan, denominator = plan_minibatch(model, objective, micros, cfg.rollout.temperature,
                                               params_fresh=params_fresh, ctx=ctx)
            if sweep == 0 and plan.selected is not None:  # for the diagnostics' select/* metrics
                selected += [x.cpu() for x in plan.selected]
            # (2) accumulate gradients; each micro-batch loss is already divided by the global count
            optimizer.zero_grad(set_to_none=True)
            loss_total, scored = accumulate_gradients(model, objective, plan, denominator, micros, cfg, ctx,
                                                      metrics, gate=gate, score_rollout_policy=fill,
                                                      collision=collision)
            if fill:  # the whole batch was this one mini-batch: later sweeps read the rollout policy's stats
                rollout_stats, fill = scored, False
                batch = batch.with_rollout_stats(scored)
            # (3) clip and (4) step, unless something is non-finite or the gate vetoes it
            outcome, grad_norm = clip_and_step(model, optimizer, cfg.optim.grad_clip, loss_total, gate,
                                               sweep // cfg.optim.ppo_epochs)
            outcomes[outcome] += 1
            metrics.add({"actor/grad_norm": grad_norm, "actor/loss": loss_total})
            params_fresh = False
            if outcome == "vetoed":
                break
        if outcomes["vetoed"]:
            break
    out = metrics.result()
    out.update({"train/optimizer_steps": outcomes["stepped"], "train/nonfinite_skipped": outcomes["nonfinite"]})
    if gate is not None:
        out.update(gate.pop_metrics())  # reuse/passes, gate_triggers, lm_head_grad_sq, z
    return PolicyUpdate(out, rollout_stats, torch.cat(selected) if selected else None)


def plan_minibatch(model, objective: TrainingObjective, micros: list[RolloutBatch], temperature: float, *,
                   params_fresh: bool, ctx: DistContext = LOCAL) -> tuple[MinibatchPlan, float]:
    """(the objective's plan for this mini-batch, its global unit count over all ranks).

    The statistics are the rollout policy's when the policy still is that one (``params_fresh``)
    or the objective takes them from the rollout (``statistics: rollout``); a no-grad pass of the
    current policy only when the objective's mask needs the current policy's.
    """
    if objective.needs_current_pass(params_fresh):
        stats = [_current_stats(model, m, temperature) for m in micros]
    else:
        stats = [TokenStats(m.old_logprobs, m.old_entropy, m.advantages, m.response_mask, m.teacher_logprobs,
                            m.old_logprobs) for m in micros]
    plan = objective.plan(stats, gather_variable if ctx.world_size > 1 else None, all_reduce_sum)
    return plan, plan.denominator


def accumulate_gradients(model, objective: TrainingObjective, plan: MinibatchPlan, denominator: float,
                         micros: list[RolloutBatch], cfg, ctx: DistContext, metrics: MetricMean, *, gate=None,
                         score_rollout_policy: bool = False, collision: bool = False):
    """Forward and backward every micro-batch; returns (the mini-batch loss over all ranks, scored).

    ``score_rollout_policy``: the policy is the rollout policy and ``old_logprobs`` is unset, so
    this forward supplies them (ρ = 1); ``scored`` is then the rows' detached ``RolloutStats``, else None.
    """
    # DDP and FSDP2 average gradients over ranks; the loss is already divided by the global
    # count, so undo the average to get the sum the single-process update has
    grad_scale = float(ctx.world_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    scored = []
    for i, m in enumerate(micros):
        out = policy_stats(model, m, cfg.rollout.temperature, with_entropy=objective.needs_entropy or score_rollout_policy,
                           with_collision=score_rollout_policy and collision)
        if score_rollout_policy:
            old = out.logprobs.detach()
            scored.append([None if x is None else x.detach().float().cpu() for x in out])
        else:
            old = m.old_logprobs.to(out.logprobs.dtype)
        loss, loss_metrics = objective.loss(plan, i, out.logprobs, old, m, entropy=out.entropy,
                                            denominator=denominator)
        if gate is not None:
            gate.track(loss)  # hook the lm_head's share of the gradient (tied embeddings)
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        loss_sum += loss.detach().double().cpu()
        metrics.add(loss_metrics, weight=float(m.response_mask.sum()))
    if score_rollout_policy:
        scored = RolloutStats(*(torch.cat(xs) if xs[0] is not None else None for xs in zip(*scored)))
    return all_reduce_sum(float(loss_sum)), (scored or None)


def clip_and_step(model, optimizer, grad_clip: float, loss_total: float, gate=None,
                  pass_index: int = 0) -> tuple[str, float]:
    """Clip the accumulated gradient and step: ("stepped" | "nonfinite" | "vetoed", grad norm)."""
    if gate is not None:
        gate.measure()  # pre-clip: clipping would cap the very spike the gate looks for
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
    if not (math.isfinite(loss_total) and torch.isfinite(grad_norm)):
        outcome = "nonfinite"
    elif gate is not None and gate.veto(pass_index):
        outcome = "vetoed"
    else:
        optimizer.step()
        outcome = "stepped"
    optimizer.zero_grad(set_to_none=True)
    return outcome, float(grad_norm)


@torch.no_grad()
def _current_stats(model, micro: RolloutBatch, temperature: float) -> TokenStats:
    out = policy_stats(model, micro, temperature)
    return TokenStats(out.logprobs.float(), out.entropy.float(), micro.advantages, micro.response_mask,
                      micro.teacher_logprobs, micro.old_logprobs)
