"""A run directory is the run's own (docs/reliability.md, round 2): ``run_name`` is a name, the run lies
under ``output_dir``, and a clean start removes only what stapo wrote. Real `stapo train` calls, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import test_reliability
from stapo.cli import main
from stapo.trainer.checkpoint import checkpoint_dirs, verify_checkpoint
from test_reliability import ENV, one_line_error, steps_of, tiny_args, wait_for

base_run = test_reliability.base_run  # fixtures: the shared 2-step run (checkpoints 1 and 2) and its copy
run_copy = test_reliability.run_copy


def refused(capsys, argv, *fragments) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    return one_line_error(subprocess.CompletedProcess([], code, "", err), "stapo train: error:", *fragments)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def user_folder(root: Path) -> Path:
    """A folder of a user's own work, with one name (metrics.jsonl) that stapo also writes."""
    (root / "plots").mkdir(parents=True)
    (root / "plots" / "figure1.png").write_bytes(b"\x89PNG user figure")
    (root / "tensorboard").mkdir()
    (root / "rollouts").mkdir()
    (root / "rollouts" / "notes.txt").write_text("my notes\n")
    (root / "metrics.jsonl").write_text('{"step": 0, "mine": 1}\n')
    return root


@pytest.mark.parametrize("name", ["../escape", ".", "..", "a/b", "ABSOLUTE"])
def test_run_name_that_is_a_path_is_refused_and_writes_nothing(tiny_model_dir, tmp_path, capsys, name):
    out = tmp_path / "runs"
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    refused(capsys, ["train", *tiny_args(tiny_model_dir, out, "steps=1"), f"run_name={name}"],
            f"run_name {name!r} must be a plain name")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output_dir, no escape, no elsewhere


def test_an_absolute_run_name_never_touches_the_users_folder(tiny_model_dir, tmp_path, capsys):
    """The issue's case: run_name=/that/folder used to clean it out."""
    folder = user_folder(tmp_path / "that" / "folder")
    before = tree(folder)
    refused(capsys, ["train", *tiny_args(tiny_model_dir, tmp_path / "runs", "steps=1"), f"run_name={folder}"],
            "must be a plain name")
    assert tree(folder) == before and not (tmp_path / "runs").exists()


def test_a_run_name_that_names_a_users_folder_is_refused_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    folder = user_folder(out / "mine")
    before = tree(folder)
    line = refused(capsys, ["train", *tiny_args(tiny_model_dir, out, "steps=1"), "run_name=mine"],
                   f"run directory {folder} holds files stapo did not write")
    assert "metrics.jsonl" in line and "plots/figure1.png" in line  # not a stapo run: even its metrics
    assert tree(folder) == before  # no .lock either


def test_a_stapo_run_with_a_users_file_is_refused_and_its_own_leftovers_are_cleaned(tiny_model_dir, tmp_path,
                                                                                      capsys):
    out = tmp_path / "runs"
    args = tiny_args(tiny_model_dir, out, "steps=1", "save_every=100", "data.heldout=null")
    run_dir = out / "run"
    # an earlier attempt that died before its first save, leaving stapo's own files behind
    run_dir.mkdir(parents=True)
    (run_dir / "config_history.jsonl").write_text('{"step": 0, "event": "start"}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    (run_dir / "rollouts").mkdir()
    (run_dir / "rollouts" / "step_000002.parquet").write_bytes(b"old dump")
    (run_dir / "checkpoints" / ".tmp-step_000003" / "policy").mkdir(parents=True)
    (run_dir / "checkpoints" / ".tmp-step_000003" / "policy" / "model.safetensors").write_bytes(b"half")
    (run_dir / "rollouts" / "notes.txt").write_text("mine\n")
    before = tree(run_dir)
    refused(capsys, ["train", *args], "holds files stapo did not write (rollouts/notes.txt)")
    assert tree(run_dir) == before
    (run_dir / "rollouts" / "notes.txt").unlink()
    assert main(["train", "--quiet", *args]) == 0
    assert steps_of(run_dir) == [0, 1]  # a clean start: the old rows are gone
    assert not (run_dir / "rollouts").exists() and not (run_dir / "checkpoints" / ".tmp-step_000003").exists()


def test_output_dir_that_is_a_file_or_read_only_is_one_line(tiny_model_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    for out in (a_file, a_file / "runs"):
        refused(capsys, ["train", *tiny_args(tiny_model_dir, out, "steps=1")],
                f"output_dir {out}: {a_file} is a file, not a folder")
    read_only = Path("/proc/sys")  # mounted read-only for every user, root included
    if os.access(read_only, os.W_OK):
        pytest.skip("/proc/sys is writable here")
    refused(capsys, ["train", *tiny_args(tiny_model_dir, read_only / "runs", "steps=1")],
            f"output_dir {read_only / 'runs'}: {read_only} is not writable")
    assert a_file.read_text() == "not a folder\n"


# --- checkpoints and resume ----------------------------------------------------------------------


def test_a_checkpoint_without_manifest_and_weights_falls_back_with_a_warning(run_copy, capsys):
    _, run_dir = run_copy
    gone = run_dir / "checkpoints" / "step_000002"
    (gone / "manifest.json").unlink()
    (gone / "policy" / "model.safetensors").unlink()
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=3"]) == 0
    err = capsys.readouterr().err
    assert ("checkpoint step_000002 is corrupt (manifest.json: missing, policy/*.safetensors: missing)" in err
            and "resuming from step_000001" in err and "Traceback" not in err), err
    assert steps_of(run_dir) == [0, 1, 2, 3]


def test_resume_at_or_below_the_checkpoint_says_so_and_changes_nothing(run_copy, capsys):
    _, run_dir = run_copy
    before = tree(run_dir)
    line = refused(capsys, ["train", "--resume", str(run_dir), "steps=1"],
                   "steps=1 is at or below the checkpoint's step 2; nothing changed",
                   f"`stapo train --resume {run_dir} steps=M` with M > 2")
    assert line and tree(run_dir) == before  # config.yaml, its history and the metrics as they were
    # a finished run: at once, before the model loads, and the way on
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"stapo train: {run_dir} is at step 2 of 2: nothing to train; to continue, " in out
    assert "stapo run" not in out  # no summary table: nothing ran
    assert tree(run_dir) == before


def test_config_yaml_is_headed_by_the_objective_line(base_run):
    from stapo.config import build_config, objective_line

    cfg, run_dir = base_run
    first = (run_dir / "config.yaml").read_text().splitlines()[0]
    assert first == f"# {objective_line(cfg)}" and first.startswith("# objective stapo: ")
    assert objective_line(build_config(str(run_dir / "config.yaml"))) == objective_line(cfg)


# --- disk ---------------------------------------------------------------------------------------

def test_enospc_while_saving_removes_the_partial_checkpoint_and_the_previous_one_resumes(run_copy, capsys,
                                                                                        monkeypatch):
    _, run_dir = run_copy
    monkeypatch.setenv("STAPO_CHECKPOINT_FAULT", "enospc")  # the state file goes to /dev/full: a real ENOSPC
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resuming at step 2 with changes: steps 2 -> 3\n") and "Traceback" not in err, err
    one_line_error(subprocess.CompletedProcess([], 2, "", err.split("\n", 1)[1]),  # the one line after it
                   "stapo train: error: checkpoint step 3 not saved: No space left on device",
                   "removed the partial .tmp-step_000003", "the previous checkpoint step_000002 is intact")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000001", "step_000002"]
    assert verify_checkpoint(ckpts / "step_000002") == []
    monkeypatch.delenv("STAPO_CHECKPOINT_FAULT")
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=3"]) == 0
    assert steps_of(run_dir) == [0, 1, 2, 3]


def test_enospc_while_writing_metrics_is_one_line_and_the_run_resumes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_model_dir, tmp_path, "steps=400", "save_every=1", "data.heldout=null")
    proc = subprocess.Popen([sys.executable, "-m", "stapo", "train", "--quiet", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint_dirs(run_dir), proc)
        kept = tmp_path / "metrics.kept"
        shutil.copy(run_dir / "metrics.jsonl", kept)
        os.symlink("/dev/full", tmp_path / "full")
        os.replace(tmp_path / "full", run_dir / "metrics.jsonl")  # the disk is full from the next row on
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    one_line_error(subprocess.CompletedProcess([], proc.returncode, "", err),
                   f"cannot write {run_dir / 'metrics.jsonl'} (No space left on device)",
                   f"`stapo train --resume {run_dir}`")
    os.replace(kept, run_dir / "metrics.jsonl")  # space freed
    saved = int(checkpoint_dirs(run_dir)[-1].name.split("_")[1])
    assert main(["train", "--quiet", "--resume", str(run_dir), f"steps={saved + 1}"]) == 0
    assert steps_of(run_dir) == list(range(saved + 2))


@pytest.mark.parametrize("victim", [".config.yaml.tmp", "rollouts/step_000003.parquet.tmp"])
def test_enospc_on_any_other_write_is_one_line_and_the_run_resumes(run_copy, capsys, victim):
    """config.yaml at the start, a rollout dump mid-run: each is a real ENOSPC (/dev/full)."""
    _, run_dir = run_copy
    (run_dir / victim).parent.mkdir(exist_ok=True)
    os.symlink("/dev/full", run_dir / victim)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=3", "diagnostics.dump_every=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().count("\n") <= 1, err  # the resume line, then one line
    name = "config.yaml" if victim.startswith(".config") else victim.removesuffix(".tmp")
    assert err.rstrip().splitlines()[-1].startswith(f"stapo train: error: cannot write {run_dir / name} ")
    assert "(No space left on device); every checkpoint already saved is intact" in err
    assert f"`stapo train --resume {run_dir}`" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    (run_dir / victim).unlink(missing_ok=True)  # space freed (pyarrow removes the file it could not write)
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=3"]) == 0
    assert steps_of(run_dir) == [0, 1, 2, 3]


def test_a_resumed_run_maps_no_checkpoint_file_so_pruning_frees_the_disk(run_copy):
    """While a resumed run goes on, the checkpoint it loaded is pruned: it must not stay mapped (listed
    "(deleted)" in /proc/PID/maps, its disk space still in use)."""
    _, run_dir = run_copy
    proc = subprocess.Popen([sys.executable, "-m", "stapo", "train", "--quiet", "--resume", str(run_dir),
                             "steps=400", "save_every=1", "keep_last=1"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [p.name for p in checkpoint_dirs(run_dir)] not in ([], ["step_000001", "step_000002"],
                                                                           ["step_000002"]), proc)
        mapped = [line for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines() if str(run_dir) in line]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "checkpoints" / "step_000002").exists()  # the loaded one was pruned
    assert mapped == []


# --- non-finite numbers (issue 24) ----------------------------------------------------------------

def test_a_step_with_a_nan_gradient_is_skipped_and_says_so(run_copy, capsys, monkeypatch):
    _, run_dir = run_copy
    monkeypatch.setenv("STAPO_TEST_NAN", "grad@3")  # test hook: step 3's gradient is NaN
    assert main(["train", "--quiet", "--resume", str(run_dir), "steps=4", "save_every=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: step 3: non-finite loss or grad norm, optimizer step skipped (1 in a row)" in err, err
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["train/optimizer_steps"] == 0 and rows[3]["train/nonfinite_skipped"] > 0
    assert rows[4]["train/optimizer_steps"] > 0  # the next step trains again
    assert verify_checkpoint(checkpoint_dirs(run_dir)[-1]) == [] and checkpoint_dirs(run_dir)[-1].name == "step_000004"


def test_non_finite_weights_stop_the_run_and_are_never_saved(run_copy, capsys, monkeypatch):
    _, run_dir = run_copy
    monkeypatch.setenv("STAPO_TEST_NAN", "weights@3")  # test hook: a NaN in the weights after step 3's update
    with pytest.raises(SystemExit, match=r"training stopped: step 3: the update left non-finite values in the "
                                         r"weights \(model\.embed_tokens\.weight\); not saved, the last "
                                         r"checkpoint step_000002 is intact"):
        main(["train", "--quiet", "--resume", str(run_dir), "steps=4", "save_every=1"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert verify_checkpoint(run_dir / "checkpoints" / "step_000002") == []


def test_save_checkpoint_refuses_non_finite_weights(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from stapo.trainer.checkpoint import CheckpointError, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model, None, optimizer, None, {})
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 not saved: the weights hold non-finite values "
                                              r"\(.*\); the run stops; the previous checkpoint step_000001"):
        save_checkpoint(tmp_path, 2, model, None, optimizer, None, {})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]


def test_a_step_without_any_learning_signal_is_counted_and_warned_about(tiny_model_dir, tmp_path, capsys):
    args = tiny_args(tiny_model_dir, tmp_path, "steps=2", "data.heldout=null",
                     "reward.name=helpers.rewards:constant_reward")  # every group: equal rewards
    assert main(["train", "--quiet", *args]) == 0
    err = capsys.readouterr().err
    for step in (1, 2):
        assert (f"warning: step {step}: all 4 groups have equal rewards (zero advantage): no learning signal "
                "this step") in err, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [(r["reward/zero_signal_groups"], r["reward/groups"]) for r in rows] == [(4, 4), (4, 4)]


def test_mixed_rewards_count_only_the_constant_groups(base_run):
    _, run_dir = base_run  # digit_reward: mixed groups in most steps
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    assert all(0 <= r["reward/zero_signal_groups"] <= r["reward/groups"] == 4 for r in rows)
