"""How verl finds stapo's plugin: each loading route in a fresh process (`make test-verl`).

verl loads worker-side plugins at `import verl` (VERL_USE_EXTERNAL_MODULES, the `verl.plugins`
entry-point group) or when it builds the model config (`actor_rollout_ref.model.external_lib`).
VERL_USE_EXTERNAL_PLUGINS=none switches the entry-point route off, so each route is seen alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

if os.environ.get("STAPO_REQUIRE_VERL") == "1":
    import verl  # noqa: F401
else:
    pytest.importorskip("verl")

pytestmark = pytest.mark.verl

PROBE = """
import json, sys
{setup}
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.workers.engine.base import BaseEngine
print(json.dumps({{
    "stapo": "stapo" in POLICY_LOSS_REGISTRY, "entropy20": "entropy20" in POLICY_LOSS_REGISTRY,
    "hook": getattr(BaseEngine.train_batch, "_stapo_hook", False),
    "module": "stapo.integrations.verl" in sys.modules,
}}))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update(extra)
    return env


def _start(setup: str, **env) -> subprocess.Popen:
    code = PROBE.format(setup=textwrap.dedent(setup))
    return subprocess.Popen([sys.executable, "-W", "ignore", "-c", code], env=_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else None), err


@pytest.fixture(scope="module")
def routes(tiny_model_dir):
    """Start every probe at once (each pays verl's import time), then collect."""
    off = {"VERL_USE_EXTERNAL_PLUGINS": "none"}
    procs = {
        "none": _start("import verl", **off),
        "env": _start("import verl", VERL_USE_EXTERNAL_MODULES="stapo.integrations.verl", **off),
        "entry_point": _start("import verl", VERL_USE_EXTERNAL_PLUGINS="stapo"),
        "external_lib": _start(f"""
            import verl
            from verl.workers.config import HFModelConfig
            HFModelConfig(path={str(tiny_model_dir)!r}, external_lib="stapo.integrations.verl")
        """, **off),
        "old_verl": _start("""
            import logging, verl
            verl.__version__ = "0.8.0"
            try:
                import stapo.integrations.verl
            except RuntimeError as err:
                print("REFUSED", err)
        """, **off),
    }
    return {name: _result(proc) for name, proc in procs.items()}


def test_not_loaded_without_a_route(routes):
    rc, seen, err = routes["none"]
    assert rc == 0, err
    assert seen == {"stapo": False, "entropy20": False, "hook": False, "module": False}


@pytest.mark.parametrize("route", ["env", "entry_point", "external_lib"])
def test_each_route_registers_losses_and_hook(routes, route):
    rc, seen, err = routes[route]
    assert rc == 0, err
    assert seen == {"stapo": True, "entropy20": True, "hook": True, "module": True}


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="verl.plugins") if ep.name == "stapo"]
    assert ep.value == "stapo.integrations.verl"


def test_unsupported_verl_refuses_to_load_and_logs(routes):
    """Under another verl the plugin raises at import, and logs at ERROR (the entry-point loader hides
    import errors at DEBUG): loss_mode=stapo then stays unregistered and verl rejects it by name."""
    rc, seen, err = routes["old_verl"]
    assert rc == 0, err
    assert seen["stapo"] is False and seen["hook"] is False
    assert "supports verl>=0.9.1,<0.10" in err  # the ERROR log line
