"""Built-in tasks come from a registry (``stapo.tasks``): the trainer resolves any registered name, for
its model and its problems, and ``stapo.demo`` registers its own tasks there."""

from __future__ import annotations

import subprocess
import sys

from stapo.config import build_config
from stapo.data.problem_sets import load_problem_sets
from stapo.demo import TASKS
from stapo.demo.task import make_problems
from stapo.tasks import _TASKS, BuiltinTask, builtin_tasks, register_task
from stapo.trainer.setup import base_model_path


def test_the_demo_registers_its_tasks():
    assert set(builtin_tasks()) >= set(TASKS) == {"demo", "demo_words"}
    assert builtin_tasks()["demo_words"].make_problems is TASKS["demo_words"].make_problems


def test_the_trainer_resolves_a_registered_task(tiny_model_dir, tmp_path):
    built = []

    def build_model(cache_dir, *, seed, log):
        built.append((cache_dir, seed))
        return tiny_model_dir

    register_task(BuiltinTask("tiny_task", lambda n, seed, split: make_problems(n, seed=seed + 7), build_model))
    try:
        cfg = build_config(None, ["model.name_or_path=tiny_task", "data.train=tiny_task", "data.heldout=tiny_task",
                                  "data.heldout_size=3", f"output_dir={tmp_path}", "seed=2"])
        assert base_model_path(cfg) == str(tiny_model_dir)
        assert built == [(tmp_path / "_demo_base" / "seed2", 2)]
        train, heldout = load_problem_sets(cfg)
        assert train == make_problems(4096, seed=9) and heldout == make_problems(3, seed=9)
    finally:
        del _TASKS["tiny_task"]


def test_importing_the_trainer_does_not_import_the_demo():
    code = "import sys, stapo.trainer.loop, stapo.trainer.setup; print('stapo.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
