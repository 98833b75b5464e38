"""Config input read as the user means it, and hostile input refused in one line before any work:
enum spellings (every Literal key, found from the dataclasses), the one dtype vocabulary, the one
quiet flag, YAML alias bombs and duplicate keys, objective options checked by the objectives' own
config dataclasses, and the generated key listing."""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import pytest
import torch
import yaml

from stapo.cli import build_parser, main
from stapo.config import ConfigError, TrainConfig, build_config, canonical_dtype
from stapo.config.fields import field_bounds, is_statistic, options_of
from stapo.config.keys import config_keys
from stapo.config.schema import BOOLEAN_WORDS, TRUTH_VALUES, Aliases
from stapo.models.loading import eval_dtype
from stapo.objectives import OBJECTIVES, STAPOConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = {w: truth for truth, words in BOOLEAN_WORDS.items() for w in words}  # on/yes/true, off/no/false


def leaf_keys(cls=TrainConfig, prefix=""):
    """(dotted key, annotation) of every leaf key, walking the dataclasses."""
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        if dataclasses.is_dataclass(tp):
            yield from leaf_keys(tp, f"{prefix}{name}.")
        else:
            yield prefix + name, tp


def enum_keys():
    """(dotted key, allowed values, aliases) of every Literal key (also under Annotated or | None)."""
    for key, tp in leaf_keys():
        aliases = {}
        if get_origin(tp) is Annotated:
            tp, *extras = get_args(tp)
            aliases = next((e for e in extras if isinstance(e, Aliases)), {})
        literals = [a for a in (get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else (tp,))
                    if get_origin(a) is Literal]
        if literals:
            yield key, get_args(literals[0]), aliases


def get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def nested(key, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


ENUMS = list(enum_keys())


def test_the_walk_finds_the_enum_keys():
    found = {key for key, _, _ in ENUMS}
    assert {"model.dtype", "model.bf16_autocast", "data.use_chat_template",
            "objective.statistics", "parallel.strategy", "reuse.gate", "reuse.statistic"} <= found


@pytest.mark.parametrize(("key", "allowed", "aliases"), ENUMS, ids=[k for k, _, _ in ENUMS])
def test_every_enum_key_reads_each_spelling_on_the_command_line_and_in_a_file(key, allowed, aliases, tmp_path):
    spellings = {v: v for v in allowed} | {v.upper(): v for v in allowed} | dict(aliases)
    for word, truth in WORDS.items():  # YAML reads these as booleans; they mean the value of that truth
        meant = [v for v in allowed if v in TRUTH_VALUES[truth]]  # e.g. on -> "on", off -> "off" or "none"
        if meant:
            spellings |= {word: meant[0], word.capitalize(): meant[0], f'"{word}"': meant[0]}
        else:  # no value of that truth: refused, and the message says why YAML made it a boolean
            with pytest.raises(ConfigError, match=rf"'{key}' must be one of .*got {truth} \(YAML reads on/yes/true"):
                build_config(None, [f"{key}={word}"])
    path = tmp_path / "c.yaml"
    for typed, meant in spellings.items():
        assert get(build_config(None, [f"{key}={typed}"]), key) == meant, (key, typed)
        path.write_text(yaml.safe_dump(nested(key, "PLACEHOLDER")).replace("PLACEHOLDER", typed))
        assert get(build_config(str(path)), key) == meant, (key, typed, path.read_text())
    with pytest.raises(ConfigError, match=rf"'{key}' must be one of"):
        build_config(None, [f"{key}=no_such_value"])


BOOLS = [key for key, tp in leaf_keys() if tp is bool]


def test_every_bool_key_reads_each_spelling_bare_or_quoted(tmp_path):
    assert {"model.gradient_checkpointing", "data.shuffle", "rollout.dynamic_sampling"} <= set(BOOLS)
    path = tmp_path / "c.yaml"
    for key in BOOLS:
        for word, truth in WORDS.items():
            for typed in (word, word.upper(), f'"{word}"'):
                assert get(build_config(None, [f"{key}={typed}"]), key) is truth, (key, typed)
            path.write_text(yaml.safe_dump(nested(key, "PLACEHOLDER")).replace("PLACEHOLDER", f"'{word}'"))
            assert get(build_config(str(path)), key) is truth, (key, word)
        with pytest.raises(ConfigError, match=rf"'{key}' must be bool, got 'maybe'"):
            build_config(None, [f"{key}=maybe"])


def test_one_dtype_vocabulary_in_train_and_eval():
    pairs = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
             "fp32": "float32", "float32": "float32", "BF16": "bfloat16"}
    parser = build_parser()
    for typed, meant in pairs.items():
        assert build_config(None, [f"model.dtype={typed}"]).model.dtype == meant
        assert parser.parse_args(["eval", "--model", "m", "--dtype", typed]).dtype == meant
        assert canonical_dtype(typed) == meant
    assert eval_dtype("bf16", "cpu") is eval_dtype("bfloat16", "cpu") is torch.bfloat16
    assert eval_dtype("fp32", "cpu") is torch.float32 and eval_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ConfigError, match=r"'model.dtype' must be one of .*got 'fp8' \(also accepted: bf16 for"):
        build_config(None, ["model.dtype=fp8"])
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["eval", "--model", "m", "--dtype", "fp8"])
    assert exit_.value.code == 2


def test_every_registered_rollout_backend_is_accepted_by_train_and_eval(capsys):
    from stapo.eval.settings import EvalSettings
    from stapo.rollout import backends

    backends.register_backend(dataclasses.replace(backends.get_backend("hf"), name="hf_twin"))
    try:
        assert build_config(None, ["rollout.backend=hf_twin"]).rollout.backend == "hf_twin"
        assert EvalSettings(backend="hf_twin").backend == "hf_twin"
        assert next(k for k in config_keys() if k.key == "rollout.backend").allowed == "hf, vllm, hf_twin"
    finally:
        del backends._BACKENDS["hf_twin"]
    with pytest.raises(ConfigError, match=r"'rollout.backend' must be one of 'hf', 'vllm'; got 'hf_twin'"):
        build_config(None, ["rollout.backend=hf_twin"])
    assert main(["eval", "--model", "m", "--backend", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "stapo eval: error: --backend: unknown rollout backend 'nope'; choose one of 'hf', 'vllm'"


@pytest.mark.parametrize("command", [["train"], ["eval", "--model", "m"], ["analyze", "RUN"]])
def test_one_quiet_flag_in_every_command(command):
    parser = build_parser()
    assert parser.parse_args(command).quiet is False
    for flag in ("--quiet", "-q", "--no-progress"):
        assert parser.parse_args([*command, flag]).quiet is True


def one_line_exit_2(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_billion_laughs_is_one_line_at_once_and_leaves_no_run_folder(tmp_path, capsys):
    # 10 levels of 9 aliases: 9**10 = 3.5 billion strings once expanded, in 0.6 KB
    levels = ["    l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("steps: 2\nrollout:\n  vllm:\n" + "\n".join(levels) + "\n")
    assert bomb.stat().st_size < 2000
    out = tmp_path / "runs"
    build_config(None, [])  # imports paid before the clock starts
    start = time.perf_counter()
    line = one_line_exit_2(["train", str(bomb), f"output_dir={out}", "run_name=r"], capsys, "bomb.yaml",
                           "aliases expand to more than 100,000 values under 'rollout.vllm.")
    assert time.perf_counter() - start < 1.0, line
    assert not out.exists()
    # the same bomb as a command-line value
    flow = "{" + ", ".join(level.strip() for level in levels) + "}"
    one_line_exit_2(["train", f"rollout.vllm={flow}", f"output_dir={out}"], capsys, "override 'rollout.vllm'",
                    "aliases expand")
    assert not out.exists()


@pytest.mark.parametrize("override", ["log_every=5", "tensorboard=true"])
def test_removed_keys_are_unknown_keys_in_one_line(override, tmp_path, capsys):
    """`log_every` (read by nothing) and `tensorboard: true` (now `logger: [console, tensorboard]`) are gone."""
    key = override.split("=")[0]
    one_line_exit_2(["train", override, f"output_dir={tmp_path / 'runs'}"], capsys,
                    f"stapo train: error: unknown config key '{key}'; allowed keys here: ", "logger")
    assert not (tmp_path / "runs").exists()


def test_yaml_duplicate_and_recursive_keys_name_the_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("steps: 3\noptim:\n  lr: 1.0e-6\n  warmup_steps: 0\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: line 5: duplicate key 'optim.lr' \(first given on line 3\)"):
        build_config(str(path))
    path.write_text("steps: 3\nsteps: 4\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 'steps' \(first given on line 1\)"):
        build_config(str(path))
    path.write_text("rollout:\n  vllm: &v\n    again: *v\n")
    with pytest.raises(ConfigError, match=r"line 2: an alias refers to itself"):
        build_config(str(path))
    # a key beside a merge overrides it (YAML's meaning, not a duplicate); small aliases still work
    path.write_text("rollout:\n  vllm:\n    <<: &e {gpu_memory_utilization: 0.5, seed: 1}\n    seed: 2\n"
                    "    again: [*e, *e]\n")
    assert build_config(str(path)).rollout.vllm == {"gpu_memory_utilization": 0.5, "seed": 2, "again": [
        {"gpu_memory_utilization": 0.5, "seed": 1}] * 2}


def bad_values(cls, name):
    """Values outside option ``name``'s declared range, and one of the wrong type."""
    bounds = field_bounds(cls, name, getattr(cls(), name))
    hint = typing.get_type_hints(cls)[name]
    wrong_type = "abc" if hint is not str else 3
    if bounds is None:
        return [wrong_type] if hint is not str else []
    if bounds.choices is not None:
        return ["no_such_choice", wrong_type]
    out = [wrong_type, float("nan")]
    out += [b - 1 for b in (bounds.ge, bounds.gt) if b is not None] + [bounds.gt] * (bounds.gt is not None)
    out += [b + 1 for b in (bounds.le, bounds.lt) if b is not None] + [bounds.lt] * (bounds.lt is not None)
    return out


CASES = [(obj, name, value) for obj, spec in OBJECTIVES.items() for name in options_of(spec.config_cls)
         for value in bad_values(spec.config_cls, name)]


@pytest.mark.parametrize(("objective", "option", "value"), CASES, ids=[f"{o}-{n}-{v}" for o, n, v in CASES])
def test_every_objective_option_is_checked_by_its_dataclass_when_the_config_is_built(objective, option, value):
    with pytest.raises(ConfigError, match=rf"'objective.options.{option}' must be"):
        build_config(None, [f"objective.name={objective}", f"objective.options.{option}={value}"])


def test_objective_options_fail_in_one_line_before_the_model_and_any_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    common = ["train", str(ROOT / "configs" / "stapo_qwen3_1p7b.yaml"), f"output_dir={out}",
              f"model.name_or_path={tmp_path / 'no_model_here'}"]  # had the model been loaded, it would fail on it
    one_line_exit_2([*common, "objective.options.prob_threshold=-5"], capsys, "stapo train: error:",
                    "'objective.options.prob_threshold' must be >= 0 and <= 1; got -5.0")
    one_line_exit_2([*common, "objective.options.prob_threshold=abc"], capsys,
                    "'objective.options.prob_threshold' must be float, got 'abc'")
    one_line_exit_2([*common, "objective.options.entropy_threshold=0.5"], capsys,
                    "'objective.options.entropy_threshold' is computed by the trainer")
    assert not out.exists()


def test_the_objective_dataclasses_check_themselves_from_python_too():
    with pytest.raises(ValueError, match="'prob_threshold' must be >= 0 and <= 1; got -5"):
        STAPOConfig(prob_threshold=-5)
    with pytest.raises(ValueError, match="'clip_high' must be float, got 'abc'"):
        STAPOConfig(clip_high="abc")
    assert STAPOConfig(clip_ratio_c=3).clip_ratio_c == 3.0 and isinstance(STAPOConfig(clip_ratio_c=3).clip_ratio_c, float)
    assert STAPOConfig(entropy_threshold=float("-inf")).entropy_threshold == float("-inf")  # a statistic: unchecked
    assert is_statistic(STAPOConfig, "entropy_threshold") and "entropy_threshold" not in options_of(STAPOConfig)


def test_every_key_is_listed_with_type_default_and_allowed_values(capsys):
    keys = {k.key: k for k in config_keys()}
    walked = {key for key, _ in leaf_keys()}
    assert set(keys) == walked
    assert (keys["rollout.top_p"].type, keys["rollout.top_p"].default, keys["rollout.top_p"].allowed) == (
        "float", "1.0", "> 0 and <= 1")
    assert keys["model.bf16_autocast"].allowed == "auto, on, off"
    assert "bf16=bfloat16" in keys["model.dtype"].allowed
    assert set(keys["objective.name"].allowed.split(", ")) == set(OBJECTIVES)
    assert main(["config", "--keys"]) == 0
    listing = capsys.readouterr().out
    for name, spec in OBJECTIVES.items():
        assert f"objective.options of {name} " in listing
        for option in options_of(spec.config_cls):
            assert f"objective.options.{option} " in listing
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for key in [*walked, "preset"]:
        assert f"\n  {key} " in help_text, key
    assert "\n  objective.options.norm_length    int | null    rollout.max_new_tokens " in listing


HOSTILE = ["", "null", "on", "[1]", "{1: 2}", "{a: [1]}", ".inf", ".nan", "1e400", "abc", "[]", "{}",
           "[[[[[[[[]]]]]]]]", "!!python/object/apply:os.system [echo]", "*undefined", "2024-01-01"]
SLOTS = ["steps", "objective", "objective.name", "objective.options", "objective.options.clip_low", "preset",
         "diagnostics", "rollout.vllm", "optim.betas", "model.lora.target_modules", "reward.overlong_buffer"]


@pytest.mark.parametrize("slot", SLOTS)
def test_any_typed_value_is_built_or_refused_as_a_config_error(slot):
    """No value typed for a key reaches a raw TypeError/KeyError (each once ended in a traceback)."""
    for value in HOSTILE:
        for extra in ([], ["preset=grpo"]):
            try:
                build_config(None, [f"{slot}={value}", *extra])
            except ConfigError:
                pass
