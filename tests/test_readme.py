"""The README's examples run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_opens_with_the_two_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and "make test" in first_block.splitlines()[1]


def test_objective_zoo_example_runs(capsys):
    block = next(b for b in python_blocks() if 'stapo.policy_loss("stapo"' in b)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (the README example itself)
    out = capsys.readouterr().out
    assert re.match(r"loss -?\d+\.\d{4}, silenced \d+ of \d+ candidates", out)


def test_reward_pool_example_runs_as_a_script(tmp_path):
    """Saved as a script, as a user would: spawned workers re-import it, so it needs the main guard."""
    block = next(b for b in python_blocks() if "RewardPool(" in b)
    assert 'if __name__ == "__main__":' in block
    script = tmp_path / "score.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[1.0, 0.0]"
