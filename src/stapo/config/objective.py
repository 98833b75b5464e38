"""The run's objective: which one the command chose, its own defaults, and the line that says so.

Precedence, defined here once (docs/recipes.md):

1. the file (or, with no file, the built-in demo); a ``preset: X`` key in it is applied under it;
2. an objective chosen on the command line, by ``preset=X`` or ``objective.name=X`` (the same
   choice): when X is not the file's objective, the file's ``objective`` section gives way to X's
   defaults (its name and the advantage estimator of its paper, no options), so options of the
   file's objective never leak into X; only ``objective.statistics`` (how S2T / 20-Entropy take
   their statistics, no objective's hyperparameter) is kept;
3. the command line's keys, in the order given (``objective.options.X=...`` included).

The options are then checked by the objective's own config dataclass (``stapo.config.fields``:
the type from its annotations, the range declared beside each default) and stored resolved: after
``build_config``, ``cfg.objective.options`` holds every option of the objective, with the value in
force, so the run's ``config.yaml`` and ``objective_line`` say exactly what trains.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from .fields import is_statistic, options_of
from .schema import ConfigError, apply_overrides, from_dict, merge

# The STAPO paper's comparison (arXiv 2602.15620): one model, data, rollout and optimizer; only these differ.
PAPER_OBJECTIVES = ("stapo", "justrl", "grpo", "entropy20", "dapo", "dr_grpo")
# The advantage estimator each objective's paper uses; "grpo" (group mean and std) unless listed.
PAPER_ADVANTAGE = {"dr_grpo": "dr_grpo"}  # Dr. GRPO (arXiv 2503.20783): no division by the std
# Options whose default is a key of the train config: Dr. GRPO's constant normaliser L is the
# generation budget, as the trainer sets it (``stapo.objectives.training.objective_from_config``)
FROM_TRAIN_CONFIG = {"norm_length": "rollout.max_new_tokens"}


def objective_section(name: str) -> dict[str, Any]:
    """The ``objective`` section that choosing objective ``name`` starts from: no options, its advantage."""
    return {"name": name, "advantage": PAPER_ADVANTAGE.get(name, "grpo")}


def is_preset_override(item: str) -> bool:
    return item.split("=", 1)[0].strip() == "preset"


def choose_objective(data: dict, overrides: list[str]) -> dict:
    """Steps 1 and 2 above: ``data`` (the file) with the objective the command line chose."""
    if "preset" in data:
        data = merge({"objective": objective_section(_known(data.pop("preset"), "preset"))}, data)
    given = apply_overrides({}, overrides)  # the command line's own keys, to read the choice off
    preset = given.get("preset")
    section = given.get("objective")
    name = section.get("name") if isinstance(section, dict) else None
    if name is not None:
        _known(name, "objective.name")
    if preset is not None:
        _known(preset, "preset")
        if name is not None and name != preset:
            raise ConfigError(f"preset={preset} and objective.name={name} choose two objectives; give one")
    chosen = name if name is not None else preset
    current = data.get("objective")
    current = current if isinstance(current, dict) else {}
    if chosen is None or chosen == current.get("name", _default_name()):
        return data
    fresh = objective_section(chosen)
    if "statistics" in current:
        fresh["statistics"] = current["statistics"]
    return {**data, "objective": fresh}


def resolve_options(cfg) -> None:
    """Check ``cfg.objective.options`` with the objective's config dataclass; store all its options.

    An option left unset takes its value from ``FROM_TRAIN_CONFIG`` where it is listed there.
    """
    from ..objectives import get_objective

    spec = get_objective(cfg.objective.name)
    cls, given = spec.config_cls, dict(cfg.objective.options)
    allowed = options_of(cls)
    for key in given:
        if is_statistic(cls, key):
            raise ConfigError(f"config key 'objective.options.{key}' is computed by the trainer from each "
                              "mini-batch; it is not an option")
        if key not in allowed:
            raise ConfigError(f"unknown config key 'objective.options.{key}': objective {spec.name!r} has no such "
                              f"option; its options: {', '.join(allowed)}")
    for option, source in FROM_TRAIN_CONFIG.items():
        if option in allowed:
            given.setdefault(option, attrgetter(source)(cfg))
    settings = from_dict(cls, given, "objective.options.")
    cfg.objective.options = {key: getattr(settings, key) for key in allowed}


def objective_line(cfg) -> str:
    """One line of the objective in force, e.g. ``objective justrl: clip 0.2/0.28, dual clip 10,
    token-mean, no KL, advantage grpo``: every option of the resolved config, so it cannot drift."""
    from ..objectives import get_objective

    spec = get_objective(cfg.objective.name)
    settings = spec.config(**cfg.objective.options)
    opts = {key: getattr(settings, key) for key in options_of(spec.config_cls)}
    parts = []
    if not getattr(settings, "clipped", True):  # KL-Cov: the clip options are unused
        opts = {key: value for key, value in opts.items() if key not in ("clip_low", "clip_high", "clip_ratio_c")}
        parts.append("no clip")
    if "clip_low" in opts and "clip_high" in opts:
        parts.append(f"clip {_show(opts.pop('clip_low'))}/{_show(opts.pop('clip_high'))}")
    if "clip_ratio_c" in opts:
        c = opts.pop("clip_ratio_c")
        parts.append("no dual clip" if c is None else f"dual clip {_show(c)}")
    if "loss_agg_mode" in opts:
        mode, length = opts.pop("loss_agg_mode"), opts.pop("norm_length", None)
        parts.append(f"{mode} (L = {length})" if mode == "seq-mean-token-sum-norm" else mode)
    if "kl_coef" in opts:
        kl = opts.pop("kl_coef")
        parts.append("no KL" if kl == 0 else f"KL {_show(kl)}")
    parts += [f"{key} {_show(value)}" for key, value in opts.items() if key != "norm_length"]
    parts.append(f"advantage {cfg.objective.advantage}")
    if spec.policy_statistics:
        parts.append(f"statistics {cfg.objective.statistics}")
    return f"objective {spec.name}: " + ", ".join(parts)


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _known(name: Any, key: str) -> str:
    """``name`` if it names a registered objective; else the error ``_validate`` gives for a file's."""
    from ..objectives import OBJECTIVES

    if not (isinstance(name, str) and name in OBJECTIVES):
        names = ", ".join(OBJECTIVES)
        if key == "preset":
            raise ConfigError(f"unknown preset {name!r}; choose one of {names}")
        raise ConfigError(f"config key {key!r} must be one of {names}; got {name!r}")
    return name


def _default_name() -> str:
    from .train import ObjectiveConfig

    return ObjectiveConfig.name
