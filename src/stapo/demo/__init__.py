"""The built-in demo: a synthetic arithmetic task with exact answers and a tiny warm-started policy.

- ``task``: problems (``make_problems``) and the exact-match reward (``exact_reward``).
- ``sft``: prompt/response encoding (``encode_prompt`` is what the RL trainer feeds the policy) and the SFT pass.
- ``assets``: ``build_base_model(cache_dir)``, a cached, loadable base model directory.
- ``evaluate``: accuracy through any rollout ``Generator``.
- ``words``: the ``demo_words`` task (worded solutions; STAPO's spurious-token regime).
- ``tasks``: the built-in tasks by name (``TASKS``: "demo", "demo_words").
- ``regime``: ``measure_regime``, S2T candidates / silenced fraction of a base at the paper's settings.
"""

from .assets import BaseModelSettings, base_model_dir, build_base_model, task_settings
from .evaluate import DemoEval, evaluate
from .sft import encode_example, encode_prompt
from .task import exact_reward, make_problems
from .tasks import TASKS, DemoTask, get_task

__all__ = [
    "TASKS",
    "BaseModelSettings",
    "DemoEval",
    "DemoTask",
    "base_model_dir",
    "build_base_model",
    "encode_example",
    "encode_prompt",
    "evaluate",
    "exact_reward",
    "get_task",
    "make_problems",
    "task_settings",
]
