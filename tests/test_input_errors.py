"""Every input error is one line, exit status 2 and no run folder, before the model loads
(docs/reliability.md, "Round 2: input errors and reward modules"). Real `stapo` processes, real
files, the tiny model of conftest.py and the shipped training data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.pairs import workers
from stapo.data import load_json
from stapo.data.records import DataError
from stapo.errors import UserError
from stapo.models.hub import hub_unreachable, resolve_model_source
from stapo.models.loading import load_tokenizer
from test_reliability import ENV, one_line_error, stapo, tiny_args

NO_SUCH_HUB_ID = "stapo-tests/no-such-model"


def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# --- each case: (tiny model dir, tmp_path) -> (overrides, fragments of the one error line) ---------

def non_utf8_jsonl(model, tmp):
    bad = tmp / "bad.jsonl"
    data = b'{"problem": "1 + 1?", "answer": "2"}\n{"problem": "caf\xe9 + 1?", "answer": "3"}\n'
    bad.write_bytes(data)
    return [f"data.train={bad}"], [f"{bad}: line 2 is not UTF-8 text (byte 0xe9 at offset {data.index(0xE9)})"]


def empty_parquet(model, tmp):
    empty = tmp / "empty.parquet"
    empty.write_bytes(b"")
    return [f"data.train={empty}"], [f"{empty}: the file is empty (0 bytes), not a parquet file"]


def folder_named_jsonl(model, tmp):
    folder = tmp / "x.jsonl"
    folder.mkdir()
    return [f"data.train={folder}"], [f"{folder} is a folder, not a file"]


def folder_not_a_model(model, tmp):
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("my notes\n")
    return [f"model.name_or_path={folder}"], [f"model.name_or_path: {folder} is a folder but not a model"]


def truncated_safetensors(model, tmp):
    path = model_copy(model, tmp)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return [f"model.name_or_path={path}"], [f"model.name_or_path: {weights}: ", "truncated; copy or download it again"]


def tokenizer_without_pad_or_eos(model, tmp):
    path = model_copy(model, tmp)
    edit_json(path / "tokenizer_config.json", pad_token=None, eos_token=None)
    return [f"model.name_or_path={path}"], ["has neither a pad token nor an eos token"]


def fp16_on_cpu(model, tmp):
    return [f"model.name_or_path={model}", "model.dtype=fp16"], ["model.dtype=float16 does not train on a CPU"]


def fp16_checkpoint_with_auto_dtype(model, tmp):
    path = model_copy(model, tmp)
    edit_json(path / "config.json", dtype="float16")
    return [f"model.name_or_path={path}"], ["model.dtype=auto is the checkpoint's float16, which does not train on a CPU"]


CASES = [non_utf8_jsonl, empty_parquet, folder_named_jsonl, folder_not_a_model, truncated_safetensors,
         tokenizer_without_pad_or_eos, fp16_on_cpu, fp16_checkpoint_with_auto_dtype]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(case, tiny_model_dir, tmp_path):
    overrides, fragments = case(tiny_model_dir, tmp_path)
    out = tmp_path / "runs"
    proc = stapo("train", *tiny_args(tiny_model_dir, out, "steps=1", "data.heldout=null"), *overrides)
    one_line_error(proc, "stapo train: error: ", *fragments)
    assert not out.exists(), "a run folder was left for invalid input"


def test_tokenizer_without_a_pad_token_pads_with_eos(tiny_model_dir, tmp_path):
    path = model_copy(tiny_model_dir, tmp_path)
    edit_json(path / "tokenizer_config.json", pad_token=None)
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"  # as TRL does


def test_absent_and_null_fields_are_told_apart(tmp_path):
    absent = tmp_path / "absent.jsonl"
    absent.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "solution": "4"}\n')
    with pytest.raises(DataError) as err:
        load_json(absent)
    assert str(err.value).endswith("row 1 has no field 'answer' (the row has ['problem', 'solution'])")
    null = tmp_path / "null.jsonl"
    null.write_text('{"problem": "1 + 1?", "answer": null}\n')
    with pytest.raises(DataError, match=r"null\.jsonl: row 0 field 'answer' is null$"):
        load_json(null, on_missing="error")


# --- null or empty rows: left out, counted, one warning line, by path or by preset -----------------

ROWS = [{"problem": "1 + 1?", "answer": "2"}, {"problem": "2 + 2?", "answer": None},
        {"problem": "", "answer": "6"}, {"problem": "4 + 4?", "answer": "  "}, {"problem": "5 + 5?", "answer": 10}]


def test_null_or_empty_rows_are_one_warning_line_by_path_and_by_preset(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "train").mkdir(parents=True)
    file = data_dir / "train" / "math_train.json"
    file.write_text(json.dumps(ROWS))
    by_path = stapo("data", "convert", file, tmp_path / "a.parquet")
    by_preset = stapo("data", "convert", "math_train", tmp_path / "b.parquet", "--data-dir", data_dir)
    for proc in (by_path, by_preset):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("wrote 2 problems")
        assert proc.stderr == (f"stapo: warning: {file}: left out 3 rows with a null or empty 'problem' or "
                               "'answer': rows [1, 2, 3]; 2 of 5 kept\n")


@pytest.mark.parametrize(("name", "rows", "warning"), [
    ("math_train.json", 7474 - 4, ("left out 4 rows with a null or empty 'problem' or 'answer': "
                                   "rows [886, 1009, 5328, 5330]; 7470 of 7474 kept\n")),
    ("aime_1983_2023.json", 975, ""),
])
def test_shipped_training_files_convert_by_path(name, rows, warning, shared_data_dir, tmp_path):
    path = shared_data_dir / "train" / name
    proc = stapo("data", "convert", path, tmp_path / "out.parquet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {rows} problems")
    assert proc.stderr == (f"stapo: warning: {path}: {warning}" if warning else "")


def test_convert_to_a_path_under_a_file_is_one_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"problem": "1 + 1?", "answer": "2"}\n')
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    out = tmp_path / "notes.txt" / "out.parquet"
    line = one_line_error(stapo("data", "convert", rows, out), "stapo data convert: error: ", f"OUT {out}: cannot write it")
    assert "notes.txt" in line


# --- a hub id without network: seconds, one line --------------------------------------------------

@pytest.fixture
def offline_hub():
    from huggingface_hub import constants

    if hub_unreachable(constants.ENDPOINT) is None:
        pytest.skip("the Hugging Face Hub is reachable here: the offline path is not taken")


def test_hub_id_without_network_resolves_in_seconds(offline_hub):
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"model.name_or_path={NO_SUCH_HUB_ID}: not a local folder nor in the "
                                        r"Hugging Face cache, and the hub .* cannot be reached"):
        resolve_model_source(NO_SUCH_HUB_ID)
    assert time.monotonic() - t0 < 10


def test_hub_id_without_network_is_one_line_in_train_and_eval(offline_hub, tiny_model_dir, tmp_path):
    def timed(*args, **env):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "stapo", *map(str, args)], capture_output=True, text=True,
                              env={**ENV, **env}, check=False)
        return proc, time.monotonic() - t0

    out = tmp_path / "runs"
    # the same start-up, then a local folder that is not a model: the time a fast refusal takes here;
    # the four side by side, two at a time (each one thread), so each pair is timed under the same load
    (tmp_path / "empty").mkdir()
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        (baseline, base_s), (hub, hub_s), (offline, _), (ev, ev_s) = pool.map(lambda a: timed(*a[0], **a[1]), [
            (("train", *tiny_args(tmp_path / "empty", out, "steps=1", "data.heldout=null")), {}),
            (("train", *tiny_args(NO_SUCH_HUB_ID, out, "steps=1", "data.heldout=null")), {}),
            (("train", *tiny_args(NO_SUCH_HUB_ID, out, "steps=1")), {"HF_HUB_OFFLINE": "1"}),
            (("eval", "--model", NO_SUCH_HUB_ID, "--benchmarks", "amc23", "--limit", "1", "--out", tmp_path / "eval"),
             {})])
    one_line_error(baseline, "is a folder but not a model")
    one_line_error(hub, f"stapo train: error: model.name_or_path={NO_SUCH_HUB_ID}: not a local folder", "cannot be reached")
    assert hub_s < base_s + 10, f"the hub id took {hub_s:.0f} s, a local refusal {base_s:.0f} s"
    one_line_error(offline, "(HF_HUB_OFFLINE is set)")
    one_line_error(ev, f"stapo eval: error: --model={NO_SUCH_HUB_ID}: not a local folder", "cannot be reached")
    assert ev_s < base_s + 10, f"eval took {ev_s:.0f} s"
    assert not out.exists()


@pytest.mark.parametrize("bad", ["reward.name=nosuch_mod:fn", "model.dtype=float16"])
def test_built_in_task_refuses_bad_input_before_building_its_base_model(bad, tmp_path):
    """The built-in task (`stapo train` with no config) trains its base model on first use, for minutes:
    a bad reward module or an fp16-on-CPU dtype is refused before that, so nothing is built or written."""
    out = tmp_path / "runs"
    proc = stapo("train", f"output_dir={out}", "steps=1", bad, cwd=tmp_path)
    one_line_error(proc, bad.split("=")[0])
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no run folder, no _demo_base
