"""One objective per command: the precedence file -> preset / objective.name -> overrides, the paper's
matched recipes (configs/stapo_qwen3_1p7b.yaml preset=X), the objective line, and a real run of the
1.7B recipe on the tiny model whose config.yaml holds the objective that trained."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from stapo.cli import main
from stapo.config import PAPER_OBJECTIVES, ConfigError, build_config, objective_line, to_dict
from stapo.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "stapo_qwen3_1p7b.yaml")
L = 15360  # the recipe's rollout.max_new_tokens: Dr. GRPO's constant normaliser

# What each objective's own paper sets (the matched setting adds nothing else):
PAPER = {
    # STAPO (arXiv 2602.15620, Sec. 5.1): JustRL's loss plus the S2T mask, τ_p = 0.002, q = 0.75
    "stapo": ("grpo", {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean",
                       "kl_coef": 0.0, "norm_length": L, "prob_threshold": 0.002, "entropy_quantile": 0.75}),
    # JustRL: clip-higher 0.2 / 0.28, verl's dual clip c = 10, token-mean, no KL
    "justrl": ("grpo", {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean",
                        "kl_coef": 0.0, "norm_length": L}),
    # GRPO (DeepSeekMath Eq. 3): symmetric ε = 0.2, 1/|o_i| inside and 1/G outside; KL off in the matched setting
    "grpo": ("grpo", {"clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": None, "loss_agg_mode": "seq-mean-token-mean",
                      "kl_coef": 0.0, "norm_length": L}),
    # 20-Entropy ("Beyond the 80/20 rule"): the JustRL loss on the top 20% entropy tokens, normalised by them
    "entropy20": ("grpo", {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0, "loss_agg_mode": "token-mean",
                           "kl_coef": 0.0, "norm_length": L, "top_ratio": 0.2, "normalize_by": "selected"}),
    # DAPO (arXiv 2503.14476): clip-higher 0.2 / 0.28 (Sec. 3.1), token-level mean (Sec. 3.3), no dual clip
    "dapo": ("grpo", {"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": None, "loss_agg_mode": "token-mean",
                      "kl_coef": 0.0, "norm_length": L}),
    # Dr. GRPO (arXiv 2503.20783): token sums over a constant L (the generation budget), advantages
    # without the division by the group's std
    "dr_grpo": ("dr_grpo", {"clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": None,
                            "loss_agg_mode": "seq-mean-token-sum-norm", "kl_coef": 0.0, "norm_length": L}),
}


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v}
    return out


def test_the_paper_recipes_differ_only_in_the_objective_and_carry_their_papers_defaults():
    assert set(PAPER) == set(PAPER_OBJECTIVES)
    built = {x: build_config(RECIPE, [f"preset={x}"]) for x in PAPER_OBJECTIVES}
    rest = {x: {k: v for k, v in flat(to_dict(c)).items() if not k.startswith("objective.")} for x, c in built.items()}
    for x in PAPER_OBJECTIVES:
        assert rest[x] == rest["stapo"], x
    for x, cfg in built.items():
        advantage, options = PAPER[x]
        assert (cfg.objective.name, cfg.objective.advantage, cfg.objective.options) == (x, advantage, options)
        assert cfg.objective.statistics == "current"
    # the recipe itself: the paper's model, rollout and optimizer, and rollout dumps for `stapo analyze`
    stapo = built["stapo"]
    assert (stapo.model.name_or_path, stapo.rollout.prompts_per_step, stapo.rollout.n, stapo.optim.mini_batch_prompts,
            stapo.optim.lr, stapo.optim.warmup_steps) == ("Qwen/Qwen3-1.7B-Base", 256, 8, 64, 1e-6, 10)
    assert 0 < stapo.diagnostics.dump_every <= stapo.steps // 5


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_name_and_preset_are_one_choice_with_that_objectives_defaults(name):
    by_preset, by_name = build_config(RECIPE, [f"preset={name}"]), build_config(RECIPE, [f"objective.name={name}"])
    assert to_dict(by_preset) == to_dict(by_name)
    assert by_name.objective.name == name
    if name != "stapo":  # the file's S2T options never leak into another objective
        assert "prob_threshold" not in by_name.objective.options


def test_precedence_file_then_chosen_objective_then_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("objective:\n  name: dapo\n  options: {clip_high: 0.3}\n  statistics: rollout\n")

    def obj(*overrides):
        o = build_config(str(path), list(overrides)).objective
        return o.name, o.advantage, o.options["clip_high"], o.statistics

    assert obj() == ("dapo", "grpo", 0.3, "rollout")  # 1. the file
    assert obj("preset=dapo") == obj("objective.name=dapo") == obj()  # the file's own objective: unchanged
    assert obj("preset=grpo") == ("grpo", "grpo", 0.2, "rollout")  # 2. grpo's defaults; statistics is kept
    assert obj("preset=dr_grpo") == ("dr_grpo", "dr_grpo", 0.2, "rollout")  # with its paper's advantage
    assert obj("preset=grpo", "objective.options.clip_high=0.25") == ("grpo", "grpo", 0.25, "rollout")  # 3.
    assert obj("objective.options.clip_high=0.25", "preset=grpo") == ("grpo", "grpo", 0.25, "rollout")  # any order
    assert obj("preset=dr_grpo", "objective.advantage=rloo")[:2] == ("dr_grpo", "rloo")
    assert obj("objective.options={}", "objective.options.clip_high=0.4")[2] == 0.4  # overrides apply in order
    assert obj("objective.options.clip_high=0.4", "objective.options={}")[2] == 0.28  # dapo's default again
    with pytest.raises(ConfigError, match=r"'objective.options.prob_threshold': objective 'grpo' has no such option"):
        build_config(str(path), ["preset=grpo", "objective.options.prob_threshold=0.1"])
    with pytest.raises(ConfigError, match="preset=grpo and objective.name=dapo choose two objectives"):
        build_config(str(path), ["preset=grpo", "objective.name=dapo"])
    with pytest.raises(ConfigError, match="unknown preset 'ppo2'; choose one of .*stapo"):
        build_config(str(path), ["preset=ppo2"])
    for typed in ("preset=[a]", "objective.name.x=1", "objective.name=5"):  # not a name at all: still one line
        with pytest.raises(ConfigError, match=r"unknown preset \['a'\]|'objective.name' must be one of .*; got"):
            build_config(str(path), [typed])
    # a preset key inside a file sits under that file's own keys; one on the command line wins over both
    path.write_text("preset: justrl\nobjective:\n  options: {clip_low: 0.1}\n")
    assert build_config(str(path)).objective.options["clip_low"] == 0.1
    assert build_config(str(path)).objective.name == "justrl"
    assert build_config(str(path), ["preset=stapo"]).objective.options == PAPER["stapo"][1] | {"norm_length": 1024}
    # no file: the demo, whose objective is the schema default (stapo)
    assert build_config(None, ["preset=grpo"]).objective.options["loss_agg_mode"] == "seq-mean-token-mean"


def test_the_recipe_table_in_the_docs_is_what_each_command_prints():
    text = (ROOT / "docs" / "recipes.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `stapo train (\S+) preset=(\w+)` \| `(objective [^`]+)` \|$", text, re.MULTILINE)
    assert sorted(x for _, x, _ in rows) == sorted(PAPER_OBJECTIVES)
    for path, preset, line in rows:
        assert objective_line(build_config(str(ROOT / path), [f"preset={preset}"])) == line


def test_objective_line_is_derived_from_the_resolved_options():
    cfg = build_config(RECIPE, ["preset=grpo", "objective.options.kl_coef=0.04", "objective.options.clip_ratio_c=3"])
    assert objective_line(cfg) == "objective grpo: clip 0.2/0.2, dual clip 3, seq-mean-token-mean, KL 0.04, advantage grpo"
    cfg = build_config(RECIPE, ["objective.name=dasd"])
    line = objective_line(cfg)
    for option, value in cfg.objective.options.items():  # every option of an objective the line has no words for
        if option not in ("clip_low", "clip_high", "clip_ratio_c", "loss_agg_mode", "kl_coef", "norm_length"):
            assert f"{option} {value:g}" in line if isinstance(value, float) else f"{option} {value}" in line


def test_stapo_file_trains_justrl_and_config_yaml_says_so(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """The case of issue 24: the STAPO recipe with objective.name=justrl trains justrl with its defaults."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"problem": "Compute {a} + {b}.", "answer": "{a + b}"}}\n' for a in range(4) for b in (1, 2)))
    argv = ["train", RECIPE, "objective.name=justrl", f"model.name_or_path={tiny_model_dir}", f"data.train={data}",
            f"output_dir={tmp_path / 'runs'}", "run_name=r", "steps=1", "rollout.prompts_per_step=2", "rollout.n=2",
            "rollout.max_new_tokens=4", "optim.mini_batch_prompts=2", "optim.micro_batch_size=4", "threads=1",
            "reward.num_workers=1", "--quiet"]  # --quiet hides progress, not the objective line
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "objective justrl: clip 0.2/0.28, dual clip 10, token-mean, no KL, advantage grpo"
    saved = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())
    assert saved["objective"] == {"name": "justrl", "advantage": "grpo", "statistics": "current",
                                  "options": PAPER["justrl"][1] | {"norm_length": 4}}
    assert saved["model"]["dtype"] == "bfloat16" and saved["model"]["gradient_checkpointing"] is True  # the recipe's
    assert objective_line(build_config(str(tmp_path / "runs" / "r" / "config.yaml"))) == first  # resume reads it back
