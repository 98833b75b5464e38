"""A training run's problems: the train and held-out sets its config names, and each rank's share."""

from __future__ import annotations


def load_problem_sets(cfg):
    """(train problems, held-out problems or None) of a ``TrainConfig``; an empty set is an error naming its key."""
    from ..errors import UserError

    d = cfg.data
    train_set = _load(d.train, cfg, "train")
    heldout = _load(d.heldout, cfg, "heldout")[: d.heldout_size] if d.heldout else None
    for key, spec, problems in (("data.train", d.train, train_set), ("data.heldout", d.heldout, heldout)):
        if problems is not None and not problems:
            raise UserError(f"{key}: {spec!r} holds no problems")
    return train_set, heldout


def _load(spec: str, cfg, split: str):
    from ..tasks import builtin_task

    if (task := builtin_task(spec)) is not None:  # a built-in task ("demo", "demo_words")
        n = 4096 if split == "train" else cfg.data.heldout_size
        return task.make_problems(n, seed=cfg.seed, split=split)
    from .loaders import load_problems

    fields = {}
    if cfg.data.problem_field:
        fields["problem_field"] = cfg.data.problem_field
    if cfg.data.answer_field:
        fields["answer_field"] = cfg.data.answer_field
    return load_problems(spec, data_dir=cfg.data.data_dir, **fields)


def shard(items: list, ctx) -> list:
    """This rank's contiguous share of a list (whole prompts, so a group never straddles ranks)."""
    if ctx.world_size == 1:
        return items
    if len(items) % ctx.world_size:
        raise ValueError(f"{len(items)} items cannot be split evenly over {ctx.world_size} ranks")
    k = len(items) // ctx.world_size
    return items[ctx.rank * k : (ctx.rank + 1) * k]
