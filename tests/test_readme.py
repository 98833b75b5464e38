"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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
