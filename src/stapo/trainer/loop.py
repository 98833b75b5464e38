"""`stapo train`: the RLVR loop, in the order of the STAPO paper's Algorithm 1.

Every phase is a named function from ``stapo.trainer.phases``; this file only wires them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.problem_sets import load_problem_sets, shard
from ..data.prompts import render_prompts
from ..distill import compute_teacher_logprobs
from ..distributed import (
    all_reduce_sum,
    init_distributed,
    reduce_metrics,
    shutdown,
    unwrap,
    wrap_model,
)
from ..models import loading
from ..objectives.training import objective_from_config
from ..reuse import make_gate
from ..rewards.pool import METRIC_KEYS
from ..rollout import training_generator
from . import rundir, setup
from .checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    nonfinite_parameters,
    release_mapped_files,
    save_checkpoint,
)
from .diagnose import StepDiagnostics
from .heldout import heldout_accuracy
from .logger import RunLogger, quiet_progress_bars
from .phases import (
    SUM_METRICS,
    ProblemSampler,
    attach_advantages,
    compute_old_logprobs,
    correct_rollout_engine,
    generate_rollouts,
    old_stats_from_update,
    rollout_engine_mismatch,
    score_rollouts,
    split_constant_groups,
    update_policy,
)

# test hook (docs/reliability.md): "grad@N" gives step N a NaN gradient, "weights@N" NaN weights after its update
_NAN_ENV = "STAPO_TEST_NAN"


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the last checkpoint is kept."""


def train(cfg: TrainConfig, resume: str | Path | None = None, quiet: bool = False) -> Path:
    """Run (or resume) training; returns the run directory. Under torchrun every rank calls this."""
    device = loading.resolve_device(cfg.device)
    ctx = init_distributed(cfg.parallel.strategy, device.type)
    device = loading.rank_device(device, ctx)
    try:
        # the run directory's lock is held until the run ends; third-party progress bars (transformers'
        # shard writer, datasets) would break into the progress output
        with contextlib.ExitStack() as held, quiet_progress_bars():
            return _train(cfg, ctx, device, resume, quiet or not ctx.is_main, held)
    finally:
        shutdown(ctx)


def _train(cfg: TrainConfig, ctx, device, resume, quiet: bool, held: contextlib.ExitStack) -> Path:
    interrupt = held.enter_context(_DeferredInterrupt(verbose=ctx.is_main))  # set-up: a signal stops at once
    # --- inputs, checked before the model loads: data, the run directory (locked), prompt lengths ---
    if not resume:
        rundir.check_new_run(cfg)  # run_name, output_dir: before the data is read
    train_set, heldout = load_problem_sets(cfg)
    run_dir, ckpt = held.enter_context(rundir.resume_run(resume, cfg, ctx)) if resume else (None, None)
    pool = held.enter_context(setup.reward_pool(**_reward_kwargs(cfg)))  # imports and checks a user's reward,
    # before the built-in task's base model may be trained (minutes) for the checks below
    setup.check_dtype(cfg, device, ckpt)
    setup.check_prompt_lengths(cfg, train_set, heldout, ckpt)
    if not resume:  # created only now that the config and data are valid
        run_dir = held.enter_context(rundir.new_run(cfg, ctx))
    setup.seed_everything(cfg.seed + ctx.rank)  # each rank samples its own rollouts
    if device.type == "cpu":
        setup.set_cpu_threads(cfg.threads)

    # --- set-up: policy, reference, optimizer, data, generation and reward workers ---
    model, tokenizer = setup.load_policy(cfg, device, ckpt)
    if ckpt is not None:
        release_mapped_files(model)  # so that pruning this checkpoint later frees its disk
    model.train()
    objective = objective_from_config(cfg)  # built once: its config and what it needs
    ref_model = setup.frozen_copy(model) if objective.needs_reference else None  # only when β > 0
    vocab_size = model.get_output_embeddings().weight.shape[0]
    model = wrap_model(model, ctx, device)  # DDP / FSDP2, or the model itself
    optimizer, scheduler = setup.build_optimizer(model, cfg)
    gate = make_gate(cfg.reuse, model)  # rollout reuse (DGG, docs/dgg.md); None = each batch used once
    sampler = ProblemSampler(train_set, cfg.seed, cfg.data.shuffle)  # same global order on every rank
    generator = training_generator(cfg, unwrap(model), tokenizer, ctx)  # backend kwargs from cfg.rollout
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.n
    state = {"step": 0, "consecutive_nonfinite": 0, "rollouts": 0}
    if ckpt is not None:
        state = load_trainer_state(ckpt, optimizer, scheduler, model, ctx)
        setup.apply_optim_settings(optimizer, scheduler, cfg)  # a resume's lr / weight decay overrides
        sampler.load_state_dict(state.pop("sampler"))
        if gate is not None:
            gate.load_state_dict(state.pop("reuse_gate", None))  # the z-score window, for exact resume
    heldout = shard(heldout, ctx) if heldout else None
    heldout_prompts = render_prompts(heldout, tokenizer, cfg) if heldout else None
    autocast = loading.autocast_context(cfg, device)
    diagnostics = StepDiagnostics(cfg, objective, vocab_size, ctx)

    def evaluate() -> dict[str, float]:
        if not heldout:
            return {}
        return reduce_metrics(heldout_accuracy(generator, tokenizer, pool, heldout, heldout_prompts, cfg.rollout,
                                               samples=cfg.eval_samples, seed=cfg.seed + 1 + ctx.rank))

    def checkpoint(step: int) -> None:
        path = save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler,
                               {**state, "step": step, "sampler": sampler.state_dict(),
                                **({"reuse_gate": gate.state_dict()} if gate is not None else {})},
                               cfg.keep_last, ctx)
        log.checkpoint(step, path)  # the trackers learn where it is

    with RunLogger(
        run_dir, cfg, state["step"], quiet, write=ctx.is_main
    ) as log:
        if state["step"] == 0:
            log.log(0, evaluate())
        step, stop = state["step"], False
        with interrupt.deferred():  # from here on a signal waits for the step in flight, then saves it
            while step < cfg.steps and not stop:
                step += 1
                t0 = time.perf_counter()
                # 1-2. sample P prompts (this rank's share) and generate G responses each
                problems = shard(sampler.next(P), ctx)
                batch = generate_rollouts(generator, tokenizer, problems,
                                          render_prompts(problems, tokenizer, cfg), cfg.rollout)
                t1 = time.perf_counter()
                # 3. verifiable rewards, scored in the worker pool under hard time limits
                batch, metrics = score_rollouts(pool, batch)
                sampled = len(batch)  # responses sampled this step, refills included
                if cfg.rollout.dynamic_sampling:  # DAPO: keep informative groups only, refill
                    batch, sampled, metrics = _refill(batch, metrics, pool, sampler, generator, tokenizer,
                                                      cfg, ctx)
                metrics |= _signal_metrics(batch, G, step, ctx.is_main)
                generator.sleep()  # after the last generate: a colocated engine (vLLM sleep mode) frees memory
                state["rollouts"] += int(all_reduce_sum(sampled))
                t2 = time.perf_counter()
                # 4. group-relative advantages (a group never straddles ranks)
                batch = attach_advantages(batch, G, cfg.objective.advantage)
                with autocast, _injected_nan(model, step):
                    # 5. the rollout policy's log-probs, entropy, collision, at the rollout temperature: a
                    # separate no-grad pass, unless nothing needs them before the update's first forward,
                    # which then scores them itself (5 folded into 6)
                    fused = old_stats_from_update(cfg, batch, gate=gate, ref_model=ref_model, objective=objective)
                    if not fused:
                        batch = batch.with_rollout_stats(compute_old_logprobs(
                            model, batch, cfg.rollout.temperature, cfg.optim.micro_batch_size, device,
                            with_collision=diagnostics.enabled, ref_model=ref_model))
                        metrics |= rollout_engine_mismatch(batch)  # vLLM vs trainer log-probs
                        batch, tis = correct_rollout_engine(batch, cfg.rollout.tis_cap)  # TIS: new advantages
                        metrics |= tis
                    if objective.needs_teacher:  # 5b. self-distillation (DASD, OPSD): privileged context, no grad
                        batch = dataclasses.replace(batch, teacher_logprobs=compute_teacher_logprobs(
                            model, batch, tokenizer, cfg, device))
                    # 6. ppo_epochs × mini-batches of M prompts: thresholds, accumulate, clip, step
                    update = update_policy(model, optimizer, batch, cfg, device, ctx=ctx,
                                           gate=gate, collision=diagnostics.enabled, objective=objective)
                    metrics |= update.metrics
                    if fused:  # 5, from the update's first forward
                        batch = batch.with_rollout_stats(update.rollout_stats)
                    # the rollout policy's p, H, quadrants, what S2T silences, what the objective acted on
                    metrics |= diagnostics.measure(batch, update.selected)
                scheduler.step()
                _stop_if_weights_nonfinite(model, step, run_dir)  # before they generate or are saved
                generator.wake_up()
                generator.update_weights(unwrap(model))  # the next rollouts sample the new policy
                t3 = time.perf_counter()
                metrics |= _step_metrics(batch, optimizer, t0, t1, t2, t3, state["rollouts"])
                metrics = reduce_metrics(metrics, SUM_METRICS)
                _check_finite(metrics, state, cfg, step, ctx.is_main)
                # 7. evaluate, checkpoint, log
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    metrics |= evaluate()
                if ctx.is_main and cfg.diagnostics.dump_every and step % cfg.diagnostics.dump_every == 0:
                    diagnostics.dump(run_dir / "rollouts" / f"step_{step:06d}.parquet", batch, update.selected,
                                     tokenizer, step)
                log.log(step, metrics)
                # a signal reaches each rank at its own moment (torchrun forwards it): they agree here
                stop = all_reduce_sum(float(interrupt.requested)) > 0
                if step % cfg.save_every == 0 or step == cfg.steps or stop:
                    checkpoint(step)
        if stop:
            raise Interrupted(interrupt.signum or signal.SIGTERM, step, run_dir)
    if ctx.is_main:
        from .plots import plot_run

        plot_run(run_dir)
    return run_dir


class Interrupted(RuntimeError):
    """SIGINT, SIGTERM or SIGHUP stopped the run after its step in flight; checkpoint ``step`` is saved."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved at step {step}; "
                         f"continue with `stapo train --resume {run_dir}`")


# Ctrl-C, a scheduler's preemption (SLURM, Kubernetes: SIGTERM) and a closed terminal (SIGHUP)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _DeferredInterrupt:
    """A stop signal finishes the current step, saves a checkpoint and exits; a second one aborts at once."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose  # under torchrun every rank gets the signal; rank 0 speaks
        self.defer = False  # before the steps: nothing to finish, nothing new to save

    def __enter__(self):
        self.requested, self.signum = False, None
        self._main = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if self._main else {}
        for s in self._previous:
            signal.signal(s, self._handle)
        return self

    @contextlib.contextmanager
    def deferred(self):
        self.defer = True  # and so it stays: after the loop, the step was saved
        yield self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.defer:  # set-up (loading, the first evaluation)
            self._say(f"{name} before the first step: stopping, nothing new to save")
            raise SystemExit(128 + signum)
        if self.requested and self._echo(signum):
            return
        if self.requested:  # the user (or the scheduler) insists: no save
            self._say(f"{name} again: aborting now, without saving the step in flight")
            raise SystemExit(128 + signum)
        self.requested, self.signum, self._at = True, signum, time.monotonic()
        self._say(f"{name}: finishing this step, then saving a checkpoint (send it again to abort at once)")

    def _echo(self, signum: int) -> bool:
        """Under torchrun, a signal sent to every process of a job (as SLURM does) reaches a rank twice:
        directly and forwarded by torchrun. The same signal within seconds is that echo, not a second one."""
        return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and signum == self.signum and time.monotonic() - self._at < 5

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _step_metrics(batch, optimizer, t0, t1, t2, t3, rollouts) -> dict[str, float]:
    tokens = int(batch.response_lengths.sum())
    return {
        "response/length_mean": float(batch.response_lengths.float().mean()),
        "response/truncated_fraction": float(batch.truncated.float().mean()),
        "train/lr": optimizer.param_groups[0]["lr"],
        "train/rollouts": rollouts,
        "time/generate": t1 - t0,
        "time/reward": t2 - t1,
        "time/update": t3 - t2,
        "time/step": t3 - t0,
        "perf/tokens_per_s": tokens / max(t3 - t0, 1e-9),
    }


def _check_finite(metrics: dict, state: dict, cfg: TrainConfig, step: int, speak: bool) -> None:
    """A skipped non-finite step is one line on stderr, --quiet or not; too many in a row stop the run
    (the last checkpoint stays)."""
    if metrics["train/nonfinite_skipped"] and not metrics["train/optimizer_steps"]:
        state["consecutive_nonfinite"] += 1
        if speak:
            print(f"warning: step {step}: non-finite loss or grad norm, optimizer step skipped "
                  f"({state['consecutive_nonfinite']} in a row)", file=sys.stderr, flush=True)
        if state["consecutive_nonfinite"] >= cfg.optim.max_nonfinite_steps:
            raise TrainingStopped(
                f"{state['consecutive_nonfinite']} consecutive steps had a non-finite loss or gradient norm "
                f"(optim.max_nonfinite_steps={cfg.optim.max_nonfinite_steps}); stopping. The last checkpoint "
                "is intact; lower optim.lr or check the data, then resume."
            )
    else:
        state["consecutive_nonfinite"] = 0


def _signal_metrics(batch, group_size: int, step: int, speak: bool) -> dict[str, float]:
    """``reward/zero_signal_groups``: groups (of all ranks) whose rewards are all equal, so their advantages
    are zero; a step where no group has signal is warned about, since it cannot move the policy."""
    groups = all_reduce_sum(len(batch) // group_size)
    constant = all_reduce_sum(len(split_constant_groups(batch, group_size)[1]) // group_size)
    if speak and groups and constant == groups:
        print(f"warning: step {step}: all {int(groups)} groups have equal rewards (zero advantage): no learning "
              "signal this step; check the reward function, or raise rollout.n", file=sys.stderr, flush=True)
    return {"reward/zero_signal_groups": constant, "reward/groups": groups}


@contextlib.contextmanager
def _injected_nan(model, step: int):
    """The ``STAPO_TEST_NAN`` test hook around step ``step``'s update; nothing when it is unset."""
    fault = os.environ.get(_NAN_ENV)
    if fault not in (f"grad@{step}", f"weights@{step}"):
        yield
        return
    param = next(p for p in unwrap(model).parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: torch.full_like(g, float("nan"))) if fault.startswith("grad") else None
    yield
    if hook is not None:
        hook.remove()
    else:
        with torch.no_grad():
            param.view(-1)[0] = float("nan")


def _stop_if_weights_nonfinite(model, step: int, run_dir: Path) -> None:
    """An update that left a NaN or an infinity in the weights stops the run: they would fail to generate,
    and must never be saved."""
    bad = nonfinite_parameters(model)
    if all_reduce_sum(len(bad)):
        previous = latest_checkpoint(run_dir)
        raise TrainingStopped(
            f"step {step}: the update left non-finite values in the weights"
            + (f" ({', '.join(bad[:2])}{' and more' if len(bad) > 2 else ''})" if bad else "")
            + (f"; not saved, the last checkpoint {previous.name} is intact: lower optim.lr (or use "
               f"model.dtype=bfloat16 / float32), then `stapo train --resume {run_dir}`" if previous
               else "; nothing saved: lower optim.lr (or use model.dtype=bfloat16 / float32) and start again")
        )


def _refill(batch, metrics, pool, sampler, generator, tokenizer, cfg, ctx):
    """DAPO dynamic sampling: drop groups whose rewards are all equal, and generate more until this rank has
    its share of P groups or max_refill_rounds is spent; then top up with all-equal groups if still short.

    Returns (the batch to train on, responses sampled, metrics): the reward metrics cover every response
    sampled, refills included; ``rollout/constant_groups`` is the all-equal fraction of the sampled groups.
    """
    from ..batch import RolloutBatch

    G, P = cfg.rollout.n, cfg.rollout.prompts_per_step
    share = P // ctx.world_size * G  # rows this rank trains on
    kept, constant = split_constant_groups(batch, G)
    metrics, rewards, dropped, rounds = dict(metrics), [batch.rewards], len(constant), 0
    # every rank takes part in every round, so collective calls stay matched
    while rounds < cfg.rollout.max_refill_rounds and all_reduce_sum(float(len(kept) < share)) > 0:
        rounds += 1
        problems = shard(sampler.next(P), ctx)
        extra = generate_rollouts(generator, tokenizer, problems, render_prompts(problems, tokenizer, cfg),
                                  cfg.rollout)
        extra, counts = score_rollouts(pool, extra)
        metrics.update({k: metrics[k] + counts[k] for k in METRIC_KEYS})  # the pool's counters, summed
        informative, all_equal = split_constant_groups(extra, G)
        kept = RolloutBatch.concat([kept, informative], tokenizer.pad_token_id)
        rewards.append(extra.rewards)
        dropped += len(all_equal)
    if len(kept) < share:  # too few informative groups: top up with zero-advantage ones
        kept = RolloutBatch.concat([kept, constant], tokenizer.pad_token_id)
    # each round numbered its prompts from 0
    kept = dataclasses.replace(kept.select(slice(0, share)), group_ids=torch.arange(share) // G)
    sampled = torch.cat(rewards)
    metrics.update({"reward/mean": float(sampled.mean()), "rollout/refill_rounds": rounds,
                    "rollout/constant_groups": dropped / len(sampled)})
    return kept, len(sampled), metrics


def _reward_kwargs(cfg: TrainConfig) -> dict:
    r = cfg.reward
    overlong = None
    if r.overlong_buffer:
        overlong = (cfg.rollout.max_new_tokens, r.overlong_buffer)
    return {"reward": r.name, "num_workers": r.num_workers, "timeout": r.timeout, "strict": r.strict,
            "format_weight": r.format_weight, "overlong": overlong, "import_timeout": r.import_timeout}


torch.backends.cudnn.benchmark = False  # reproducible CUDA kernels for exact resume
