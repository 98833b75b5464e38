"""Every fenced command in README.md and docs/*.md runs as written.

Each ```bash / ```sh / ```console block runs in bash, each ```python block as a script (so its
`__main__` guard matters), in a fresh folder holding the repository's files and the files a reader
brings (the `world` fixture). Long jobs are shortened in ONE way: shell functions named `stapo`, `python` and
`make` append the arguments in `SHORTEN` to `stapo train`, `stapo eval`, `make demo` and
`make test` (README, "Testing the docs"). The text of the doc is never rewritten.

A block that cannot run here carries a marker on the line before its fence,
`<!-- doc-test: skip REASON: detail -->` with REASON one of `SKIP_REASONS`, and is skipped by
name with that reason; a block that shows an error carries `<!-- doc-test: exit N -->` and must
exit N (bash stops at its first failing command). A fence that is no command (output, YAML, a
file listing) names its language (```text, ```yaml, ...); an untagged fence fails.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "console"}
RUN_LANGS = SHELL_LANGS | {"python"}
DATA_LANGS = {"text", "yaml", "json", "markdown", "toml", "ini", "diff"}
SKIP_REASONS = {
    "gpu": "needs a GPU",
    "network": "needs the network (the hub or a package index)",
    "vllm": "needs vLLM (make test-vllm)",
    "verl": "needs verl (make test-verl)",
    "placeholder": "names a path or object only the reader has",
}
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")  # a line of its own
SKIP = re.compile(r"skip\s+(\w+)(?::\s*(.+))?$")
EXIT = re.compile(r"exit\s+(\d+)$")  # a block that shows an error: its first failing command exits N
FENCE = re.compile(r"^```([^`]*)$")  # CommonMark: no backtick in the info string

# The one shortening mechanism: appended to the command as the reader typed it ({tiny}: the
# tests' tiny model, in place of a hub id or the demo's warm-started base).
SHORTEN = {
    "stapo train": ("model.name_or_path={tiny} steps=1 rollout.prompts_per_step=2 rollout.n=2 "
                    "rollout.max_new_tokens=8 rollout.generation_batch_size=4 optim.mini_batch_prompts=2 "
                    "optim.micro_batch_size=4 data.heldout=null save_every=1 diagnostics.dump_every=1 "
                    "reward.num_workers=1 threads=1"),
    "stapo train --resume": "steps=2",  # one step past the world's run
    "stapo eval --model": "--model {tiny}",
    "stapo eval": ("--limit 1 --max-new-tokens 8 --reward-workers 1 "
                   "--samples aime24=1,aime25=1,amc23=1,math500=1,minerva=1,olympiadbench=1"),
    "make demo": "OVERRIDES",  # make's variable, set to SHORTEN["stapo train"]
    "make test": "--collect-only -q tests/test_docs.py",  # PYTEST_ARGS: this very runner, collected only
}
REPO_ENTRIES = ["configs", "src", "tests", "examples", "benchmarks", "Makefile", "pyproject.toml"]
RUN_NAMES = ["stapo-s0-20261127-1200", "my_run"]  # the run the docs resume and analyze


@dataclasses.dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    heading: str
    lang: str
    text: str
    marker: str | None

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"{self.doc.relative_to(ROOT)}:{self.line}-{slug or 'top'}"


def parse(doc: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the heading above each and its marker."""
    blocks, heading, lines = [], "", doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```")
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(prev.strip())
            blocks.append(Block(doc, i + 1, heading, fence.group(1).strip().split(" ")[0],
                                "\n".join(lines[i + 1:end]) + "\n", marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = [b for doc in DOCS for b in parse(doc)]
RUNNABLE = [b for b in BLOCKS if b.lang in RUN_LANGS]


def skip_reason(block: Block) -> str | None:
    if block.marker is None or EXIT.match(block.marker):
        return None
    kind, detail = SKIP.match(block.marker).groups()
    return f"{SKIP_REASONS[kind]}: {detail}" if detail else SKIP_REASONS[kind]


def test_every_fence_names_its_language_and_every_marker_is_known():
    problems = []
    for b in BLOCKS:
        if b.lang not in RUN_LANGS | DATA_LANGS:
            problems.append(f"{b.name}: fence language {b.lang!r}; tag it one of {sorted(RUN_LANGS | DATA_LANGS)}")
        if b.marker is not None:
            m = SKIP.match(b.marker)
            if not EXIT.match(b.marker) and (not m or m.group(1) not in SKIP_REASONS):
                problems.append(f"{b.name}: marker {b.marker!r}; use 'skip REASON[: detail]' with REASON in "
                                f"{sorted(SKIP_REASONS)}, or 'exit N'")
            elif b.lang not in RUN_LANGS:
                problems.append(f"{b.name}: a skip marker on a {b.lang!r} block, which never runs")
    for doc in DOCS:  # a marker that lost its fence (text moved) would silently stop applying
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines):
            if MARKER.match(line.strip()):
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                if not nxt.startswith("```"):
                    problems.append(f"{doc.relative_to(ROOT)}:{i + 1}: marker not followed by a fence")
    assert not problems, "\n".join(problems)


def test_no_command_hides_in_an_indented_code_block():
    """An indented code block is never run: a command or a sample goes in a fence instead."""
    found = []
    for doc in DOCS:
        in_fence, prev, last_text = False, "", ""
        for i, line in enumerate(doc.read_text().splitlines()):
            if line.startswith("```"):
                in_fence = not in_fence
            elif not in_fence and line.startswith("    ") and line.strip() and not prev.strip() \
                    and not re.match(r"\s|[-*+] |\d+\. |\|", last_text):  # not a list item's continuation
                found.append(f"{doc.relative_to(ROOT)}:{i + 1}: {line.strip()[:60]}")
            if line.strip():
                last_text = line
            prev = line
    assert not found, "fence these (```bash, ```text, ...):\n" + "\n".join(found)


# ------------------------------------------------------------------ the world a block runs in


def shell_preamble(venv: Path, tiny: Path) -> str:
    """bash functions that apply SHORTEN; everything else is the reader's command as written."""
    s = {k: v.format(tiny=tiny) for k, v in SHORTEN.items()}
    return f"""set -eo pipefail
stapo() {{
  case "${{1:-}}" in
    train) if [[ " $* " == *" --resume "* ]]; then command stapo "$@" {s["stapo train --resume"]}
           else command stapo "$@" {s["stapo train"]}; fi ;;
    eval) if [[ " $* " == *" --model "* ]]; then command stapo "$@" {s["stapo eval"]} {s["stapo eval --model"]}
          elif [[ " $* " == *" --compare "* ]]; then command stapo "$@"
          else command stapo "$@" {s["stapo eval"]}; fi ;;
    *) command stapo "$@" ;;
  esac
}}
python() {{ if [ "${{1:-}}" = -m ] && [ "${{2:-}}" = stapo ]; then shift 2; stapo "$@"; else command python "$@"; fi; }}
make() {{ command make VENV={venv} -o {venv}/.stamp "$@" {s["make demo"]}="{s["stapo train"]}" PYTEST_ARGS="{s["make test"]}"; }}
"""


def block_env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    return env


def run_in(cwd: Path, cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=block_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The files the docs name that a reader brings: their data and a config (their run: `add_run`)."""
    path = tmp_path_factory.mktemp("doc_world")
    (path / "my.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    for entry in REPO_ENTRIES:
        (path / entry).symlink_to(ROOT / entry)
    cmd = ["stapo", "data", "convert", "math500", "dapo-math-17k.parquet", "--limit", "16"]
    proc = run_in(path, cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for entry in REPO_ENTRIES:
        (path / entry).unlink()
    return path


def add_run(world: Path, tiny: Path, work: Path) -> None:
    """The run the docs resume and analyze, trained in ``work`` and moved (at once) into the world's runs/,
    beside the blocks that name no run (`names_a_run`), which need none and run meanwhile."""
    work.mkdir()
    for entry in REPO_ENTRIES:
        (work / entry).symlink_to(ROOT / entry)
    short = SHORTEN["stapo train"].format(tiny=tiny).split()
    cmd = ["stapo", "train", "data.train=demo", "output_dir=runs", f"run_name={RUN_NAMES[0]}", *short]
    proc = run_in(work, cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for name in RUN_NAMES[1:]:
        shutil.copytree(work / "runs" / RUN_NAMES[0], work / "runs" / name, symlinks=True)
    (work / "runs").rename(world / "runs")


def names_a_run(block: Block) -> bool:
    return any(name in block.text for name in RUN_NAMES)


def run_block(block: Block, world: Path, tiny: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run one block in ``cwd``, a fresh copy of the world beside the repository's files."""
    shutil.copytree(world, cwd, symlinks=True)
    for entry in REPO_ENTRIES:
        (cwd / entry).symlink_to(ROOT / entry)
    if block.lang == "python":
        (cwd / "doc_block.py").write_text(block.text)
        return run_in(cwd, [sys.executable, "doc_block.py"])
    (cwd / "doc_block.sh").write_text(shell_preamble(Path(sys.prefix), tiny) + shell_text(block))
    return run_in(cwd, ["bash", "doc_block.sh"])


# tests below that read what a README block prints: the block they read
PRINTED = {"test_objective_zoo_example_prints_its_loss": 'stapo.policy_loss("stapo"',
           "test_reward_pool_example_runs_as_a_script": "RewardPool("}


def selected_blocks(items) -> list[Block]:
    """The blocks the selected tests need (all, in `make test`; fewer under -k)."""
    blocks = []
    for item in items:
        if hasattr(item, "callspec") and "block" in item.callspec.params:
            blocks.append(item.callspec.params["block"])
        elif item.name in PRINTED:
            blocks.append(readme_block(PRINTED[item.name]))
    return [b for b in blocks if skip_reason(b) is None]


@pytest.fixture(scope="module")
def results(request, world, tiny_model_dir, tmp_path_factory) -> dict:
    """The selected unmarked blocks, run once per text (README and docs/ repeat some), two at a
    time: each runs one torch thread, so two share a 2-core machine without contending. The world's
    run is trained first, beside the blocks that name no run; those that name one wait for it."""
    todo = {(b.lang, b.text): b for b in selected_blocks(request.session.items)}
    base = tmp_path_factory.mktemp("doc_blocks")
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        later = {key for key, b in todo.items() if names_a_run(b)}
        run = pool.submit(add_run, world, tiny_model_dir, base / "world_run") if later else None

        def job(b: Block, cwd: Path) -> subprocess.CompletedProcess:
            if names_a_run(b):
                run.result()  # queued after the run's job, so it is running or done
            return run_block(b, world, tiny_model_dir, cwd)

        futures = {key: pool.submit(job, b, base / f"block{i}") for i, (key, b) in enumerate(todo.items())}
        return {key: f.result() for key, f in futures.items()}


def shell_text(block: Block) -> str:
    """A console block's commands are its `$ ` lines (and their continuations); bash/sh run whole."""
    if block.lang != "console":
        return block.text
    out, cont = [], False
    for line in block.text.splitlines():
        if line.startswith("$ ") or cont:
            out.append(line.removeprefix("$ "))
            cont = line.endswith("\\")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_block_runs_as_written(block, request):
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"{block.name}: {reason}")
    proc = request.getfixturevalue("results")[(block.lang, block.text)]
    expected = int(EXIT.match(block.marker).group(1)) if block.marker and EXIT.match(block.marker) else 0
    assert proc.returncode == expected, (
        f"{block.name} exited {proc.returncode}, not {expected}; if it cannot run here, mark it "
        f"<!-- doc-test: skip REASON -->\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")


# ------------------------------------------------------------------ what particular blocks print


def readme_block(needle: str) -> Block:
    return next(b for b in RUNNABLE if b.doc.name == "README.md" and needle in b.text)


def test_readme_opens_with_the_two_commands():
    first = next(b for b in BLOCKS if b.doc.name == "README.md" and b.lang == "bash").text.splitlines()
    assert first[0].startswith("make demo") and "make test" in first[1]


def test_objective_zoo_example_prints_its_loss(results):
    block = readme_block(PRINTED["test_objective_zoo_example_prints_its_loss"])
    proc = results[(block.lang, block.text)]
    assert re.match(r"loss -?\d+\.\d{4}, silenced \d+ of \d+ candidates", proc.stdout), proc.stderr[-2000:]


def test_reward_pool_example_runs_as_a_script(results):
    """Saved as a script, as a user would: spawned workers re-import it, so it needs the main guard."""
    block = readme_block(PRINTED["test_reward_pool_example_runs_as_a_script"])
    assert 'if __name__ == "__main__":' in block.text
    proc = results[(block.lang, block.text)]
    assert proc.stdout.strip() == "[1.0, 0.0]", proc.stderr[-2000:]


def test_parser_reads_headings_markers_and_console_commands(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n\n## Run it\n\n<!-- doc-test: skip gpu: 8 GPUs -->\n\n```bash\nnvidia-smi\n```\n\n"
                   "```console\n$ stapo config --keys \\\n    | head -1\nConfig keys ...\n$ echo hi\nhi\n```\n\n```\nlisting\n```\n"
                   "<!-- doc-test: exit 2 -->\n```bash\nstapo train rollout.nn=3\n```\n")
    gpu, console, bare, error = parse(doc)
    assert (gpu.line, gpu.heading, gpu.lang, gpu.marker) == (7, "Run it", "bash", "skip gpu: 8 GPUs")
    assert skip_reason(gpu) == "needs a GPU: 8 GPUs"
    assert console.marker is None and shell_text(console) == "stapo config --keys \\\n    | head -1\necho hi\n"
    assert bare.lang == "" and bare.lang not in RUN_LANGS | DATA_LANGS  # the fence test rejects it
    assert error.marker == "exit 2" and EXIT.match(error.marker) and skip_reason(error) is None


# ------------------------------------------------------------------ commands named outside the docs


def test_commands_named_in_the_examples_exist():
    """The examples' docstrings name stapo subcommands (`stapo data convert ...`): each one exists."""
    named = {m for path in (ROOT / "examples").glob("*.py")
             for m in re.findall(r"``(stapo(?: [a-z]+){1,2})", path.read_text())}
    assert named, "no stapo command named in examples/*.py: update this test"
    for cmd in sorted(named):
        proc = run_in(ROOT, [*cmd.split(), "--help"], timeout=60)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-500:]}"


def test_verl_config_comment_prints_the_config_dir():
    """The config's own comment says how to find it; verl is only in its own environment."""
    comment = (ROOT / "src/stapo/integrations/verl_config/stapo_trainer.yaml").read_text()
    inner = re.search(r'--config-path="\$\((.*?)\)"', comment).group(1)
    verl_python = ROOT / ".venv-verl" / "bin" / "python"
    if not verl_python.exists():
        pytest.skip(f"needs verl (make test-verl): {verl_python} not built")
    proc = run_in(ROOT, ["bash", "-c", inner.replace("python ", f"{verl_python} ", 1)], timeout=120)
    assert proc.returncode == 0 and (Path(proc.stdout.strip()) / "stapo_trainer.yaml").is_file(), proc.stderr[-1000:]
