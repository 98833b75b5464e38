"""select/*: which tokens each token-selecting objective acts on (fraction, p × H quadrants, overlap with
S2T's silenced set), in metrics.jsonl and `stapo analyze`, from one function over the planner's masks."""

import json
import math

import pytest
import torch

from stapo.diagnostics import (
    DiagnosticsAccumulator,
    diagnostic_entropy_threshold,
    read_rollouts,
    token_diagnostics,
)
from stapo.diagnostics.report import dump_selection
from stapo.objectives import TokenStats
from stapo.objectives.training import build_objective
from stapo.trainer.phases import MetricMean

QUADS = ("low_p_low_h", "low_p_high_h", "high_p_low_h", "high_p_high_h")


def _hand_batch():
    """Row 0 (A = +1): p 0.001, 0.001, 0.5, 0.9 with H 0.1, 2, 0.1, 2: one token in each quadrant.
    Row 1 (A = −1, last token padding): outside the quadrants. S2T: candidates are row 0's two
    p = 0.001 tokens, τ_h = 0.1 + 0.75·(2 − 0.1) = 1.525, so it silences row 0, token 0 alone."""
    p = torch.tensor([[0.001, 0.001, 0.5, 0.9], [0.001, 0.5, 0.9, 0.5]], dtype=torch.float64)
    h = torch.tensor([[0.1, 2.0, 0.1, 2.0], [0.1, 0.5, 3.0, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return p.log(), h, adv, mask


def test_hand_built_fraction_quadrants_and_s2t_overlap():
    logp, h, adv, mask = _hand_batch()
    # the method's set: row 0 tokens 0 (low p, low H) and 3 (high p, high H), row 1 token 0 (A < 0);
    # row 1 token 3 is padding, so it does not count
    selected = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    m = token_diagnostics(logp, h, torch.exp(2 * logp), adv, logp, mask, vocab_size=8, selected=selected)
    assert m["diag/entropy_threshold"] == pytest.approx(1.525, abs=1e-12)
    assert m["diag/silenced/count"] == 1
    assert m["select/count"] == 3 and m["select/fraction"] == 3 / 7
    assert [m[f"select/quadrant/{q}/count"] for q in QUADS] == [1, 0, 0, 1]
    assert [m[f"select/quadrant/{q}/fraction"] for q in QUADS] == [1 / 3, 0, 0, 1 / 3]
    assert m["select/non_positive/count"] == 1
    assert m["select/s2t/count"] == 1 and m["select/s2t_overlap/count"] == 1
    assert m["select/s2t_overlap/of_selected"] == 1 / 3 and m["select/s2t_overlap/of_s2t"] == 1.0
    # no selected mask: no select/* key (objectives that select nothing)
    assert not any(k.startswith("select/") for k in token_diagnostics(logp, h, torch.exp(2 * logp), adv, logp, mask,
                                                                      vocab_size=8))


def _plan_selected(name, options, logp, h, adv, mask):
    obj = build_objective(name, options)
    return obj.plan([TokenStats(logp, h, adv, mask, None, logp)]).selected[0]


def test_each_objective_reports_the_tokens_it_acts_on():
    logp, h, adv, mask = _hand_batch()
    # STAPO's set is S2T's: the overlap is the whole of both
    stapo = _plan_selected("stapo", {}, logp, h, adv, mask)
    assert stapo.tolist() == [[True, False, False, False], [False] * 4]
    m = token_diagnostics(logp, h, torch.exp(2 * logp), adv, logp, mask, vocab_size=8, selected=stapo)
    assert m["select/s2t_overlap/of_selected"] == m["select/s2t_overlap/of_s2t"] == 1.0
    # KL-Cov acts on (penalises) the tokens it keeps in its mask; Clip-Cov on those it drops (detaches)
    kl = build_objective("kl_cov", {"kl_cov_ratio": 0.3})
    plan = kl.plan([TokenStats(logp, h, adv, mask, None, logp)])
    assert torch.equal(plan.selected[0], plan.keep_masks[0] & mask) and int(plan.selected[0].sum()) == 2
    cc = build_objective("clip_cov", {"clip_cov_ratio": 0.5, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9})
    plan = cc.plan([TokenStats(logp, h, adv, mask, None, logp)])
    assert torch.equal(plan.selected[0], mask & ~plan.keep_masks[0]) and int(plan.selected[0].sum()) == 3
    e20 = build_objective("entropy20", {})
    plan = e20.plan([TokenStats(logp, h, adv, mask, None, logp)])
    assert torch.equal(plan.selected[0], plan.keep_masks[0] & mask)
    assert build_objective("grpo", {}).plan([TokenStats(logp, h, adv, mask, None, logp)]).selected is None


def _random_minibatch(rows=12, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, width, 5, generator=g, dtype=torch.float64) * 3
    logp_all = logits.log_softmax(-1)
    tok = torch.randint(0, 5, (rows, width), generator=g)
    logp = logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    h = -(logp_all.exp() * logp_all).sum(-1)
    mask = torch.arange(width).unsqueeze(0) < torch.randint(2, width + 1, (rows, 1), generator=g)
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    return logp, h, adv, mask


@pytest.mark.parametrize("name,options", [
    ("clip_cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": -1e9, "clip_cov_ub": 1e9}),
    ("kl_cov", {"kl_cov_ratio": 0.2}),
])
def test_totals_are_the_same_whole_or_in_micro_batches(name, options):
    logp, h, adv, mask = _random_minibatch()
    obj = build_objective(name, options)
    tau = diagnostic_entropy_threshold([(logp, h, adv, mask)])
    results = []
    for size in (12, 5, 1):  # whole, uneven pieces, one row each
        pieces = [(logp[i:i + size], h[i:i + size], adv[i:i + size], mask[i:i + size]) for i in range(0, 12, size)]
        stats = [TokenStats(lp, e, a, m, None, lp) for lp, e, a, m in pieces]
        torch.manual_seed(7)  # Clip-Cov draws from the run's generator
        plan = obj.plan(stats)
        acc, mean = DiagnosticsAccumulator(), MetricMean()
        for i, (lp, e, a, m) in enumerate(pieces):
            acc.add(lp, e, torch.exp(2 * lp), a, lp, m, vocab_size=5, entropy_threshold=tau, selected=plan.selected[i])
            _, loss_metrics = obj.loss(plan, i, lp, lp, _Micro(a, m), entropy=e, denominator=plan.denominator)
            mean.add(loss_metrics, weight=float(m.sum()))  # the trainer's reduction (phases.update_policy)
        sel = {k: v for k, v in acc.finalize().items() if k.startswith("select/")}
        key = {"clip_cov": "clip_cov/detached", "kl_cov": "kl_cov/penalised"}[name]
        out = mean.result()
        results.append((torch.cat(plan.selected), sel, out[key], out[f"{key}_fraction"]))
    whole = results[0]
    assert whole[1]["select/count"] >= 2
    assert whole[2] == whole[1]["select/count"]  # the loss's own count, summed, is the mini-batch total
    assert whole[3] == pytest.approx(whole[1]["select/fraction"], rel=1e-6)
    for got in results[1:]:
        assert torch.equal(got[0], whole[0])
        assert got[1] == whole[1]
        assert got[2] == whole[2] and got[3] == pytest.approx(whole[3], rel=1e-6)


class _Micro:
    """The fields ``TrainingObjective.loss`` reads from a micro-batch."""

    def __init__(self, advantages, response_mask):
        self.advantages, self.response_mask = advantages, response_mask
        self.ref_logprobs = self.teacher_logprobs = None


def test_clip_cov_train_then_analyze_reports_its_tokens(tiny_model_dir, tmp_path):
    import test_trainer
    from stapo.cli import main
    from stapo.trainer.loop import train

    # one mini-batch a step, so the dump (the step's batch) and the metrics cut S2T alike; τ_p 0.3 so
    # S2T silences some tokens of this tiny random model; wide bounds: every valid token a candidate
    cfg = test_trainer.tiny_cfg(tiny_model_dir, tmp_path, "objective.name=clip_cov", "steps=1",
                                "optim.mini_batch_prompts=4", "diagnostics.dump_every=1",
                                "diagnostics.prob_threshold=0.3",
                                "objective.options={clip_cov_ratio: 0.3, clip_cov_lb: -1.0e9, clip_cov_ub: 1.0e9}")
    run_dir = train(cfg, quiet=True)
    step = test_trainer.rows(run_dir)[-1]
    keys = ["select/count", "select/fraction", "select/non_positive/count", "select/s2t/count",
            "select/s2t_overlap/count", "select/s2t_overlap/of_selected", "select/s2t_overlap/of_s2t"]
    keys += [f"select/quadrant/{q}/{k}" for q in QUADS for k in ("count", "fraction")]
    assert set(keys) <= set(step), sorted(set(keys) - set(step))
    assert step["select/count"] == step["clip_cov/detached"] > 0
    assert step["select/s2t/count"] == step["diag/silenced/count"] > 0
    assert sum(step[f"select/quadrant/{q}/count"] for q in QUADS) + step["select/non_positive/count"] == \
        step["select/count"]
    # the dump holds the same tokens, and the report's table the same numbers, from the same function
    table = read_rollouts(run_dir)
    assert json.loads(table.schema.metadata[b"stapo"])["action"] == "detached"
    dumped = dump_selection(table)
    assert {k: dumped[k] for k in keys} == pytest.approx({k: step[k] for k in keys}, rel=1e-12)
    assert main(["analyze", str(run_dir)]) == 0
    report = (run_dir / "analysis" / "report.md").read_text()
    section = report.split("## Tokens the objective acts on")[1].split("\n## ")[0]
    assert "(**detached**)" in section
    for k in keys:
        line = next(ln for ln in section.splitlines() if ln.startswith(f"| `{k}` |"))
        cells = [c.strip() for c in line.split("|")[2:4]]
        assert cells == [f"{step[k]:.4g}"] * 2 and math.isfinite(float(cells[0]))
