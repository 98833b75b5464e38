"""Datasets by local folder or hub id (``hf:NAME[:split]``), through the real ``datasets`` library.

Every folder here is written by ``datasets`` itself (``save_to_disk``) or holds plain data files that
``datasets.load_dataset`` reads; the hub path is checked for its offline error (no hub in tests).
"""

from __future__ import annotations

import datasets
import pytest

from stapo.config import build_config
from stapo.data import DataError, Problem, load_problems, write_verl_parquet
from stapo.data.problem_sets import load_problem_sets

ROWS = [
    {"q": "What is 2+3?", "a": 5.0, "info": {"level": 1, "gold": "5"}, "uid": "x0"},
    {"q": "Solve $x^2=4$, $x>0$.", "a": 2.0, "info": {"level": 2, "gold": "2"}, "uid": "x1"},
    {"q": "What is 7*6?", "a": 42.0, "info": {"level": 1, "gold": "42"}, "uid": "x2"},
]


@pytest.fixture
def saved_dict(tmp_path):
    """A DatasetDict (train + test) written with save_to_disk."""
    folder = tmp_path / "my_math"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(folder))
    return folder


def test_save_to_disk_folder_with_field_options(saved_dict):
    problems = load_problems(saved_dict, problem_field="q", answer_field="a", id_field="uid")
    assert [p.id for p in problems] == ["my_math/x0", "my_math/x1", "my_math/x2"]
    assert [p.answer for p in problems] == ["5", "2", "42"]  # numbers canonical, as the JSON loader
    assert problems[1].prompt == ROWS[1]["q"] and problems[1].meta["info"] == {"level": 2, "gold": "2"}
    # hf:FOLDER:SPLIT picks another split; dotted fields reach nested columns; limit
    test = load_problems(f"hf:{saved_dict}:test", problem_field="q", answer_field="info.gold")
    assert test == [Problem("my_math/0", ROWS[0]["q"], "5", "my_math", {k: ROWS[0][k] for k in ("a", "info", "uid")})]
    assert len(load_problems(f"hf:{saved_dict}", limit=2, problem_field="q", answer_field="a")) == 2
    with pytest.raises(DataError, match=r"dataset '.*my_math': no split 'validation'; it has train, test"):
        load_problems(f"hf:{saved_dict}:validation", problem_field="q", answer_field="a")
    with pytest.raises(DataError, match=r"my_math'.*row 0 has no field 'problem'"):
        load_problems(saved_dict)  # default fields: problem / answer


def test_single_split_saved_dataset(tmp_path):
    folder = tmp_path / "one"
    datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}]).save_to_disk(str(folder))
    assert load_problems(folder)[0].answer == "2"


def test_folder_of_data_files(tmp_path):
    """A folder of parquet files in the verl schema (as DAPO-Math-17k) and one of JSON-lines files."""
    problems = [Problem("s/0", "What is 1+1?", "2", "s"), Problem("s/1", "Pairs?", ["1", "3"], "s")]
    verl = tmp_path / "verl_folder"
    write_verl_parquet(problems, verl / "part-0.parquet", template="dapo")
    back = load_problems(verl)
    assert [(p.id, p.prompt, p.answer, p.source) for p in back] == [
        (p.id, p.prompt, p.answer, p.source) for p in problems
    ]
    jsonl = tmp_path / "jsonl_folder"
    jsonl.mkdir()
    (jsonl / "train.jsonl").write_text('{"question": "3+4?", "final": 7}\n{"question": "1+2?", "final": 3}\n')
    got = load_problems(f"hf:{jsonl}", problem_field="question", answer_field="final", source="mine")
    assert [(p.id, p.answer) for p in got] == [("mine/0", "7"), ("mine/1", "3")]
    with pytest.raises(DataError, match="dataset .*jsonl_folder'.*test"):
        load_problems(f"hf:{jsonl}:test", problem_field="question", answer_field="final")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"hf:ORG/NO_SUCH_SET:train: could not load it from the Hugging Face Hub "
                                        r"\(ConnectionError: .*\)\. Without network.*save_to_disk"):  # fmt: skip
        load_problems("hf:ORG/NO_SUCH_SET")
    with pytest.raises(FileNotFoundError, match="dataset folder './missing' not found"):
        load_problems("hf:./missing")


def test_train_config_reads_a_dataset_folder(saved_dict):
    cfg = build_config(None, [f"data.train=hf:{saved_dict}:train", "data.problem_field=q",
                              "data.answer_field=a", "data.heldout_size=4"])  # fmt: skip
    train, heldout = load_problem_sets(cfg)
    assert [p.answer for p in train] == ["5", "2", "42"] and len(heldout) == 4


def test_cli_convert_reads_a_dataset_folder(saved_dict, tmp_path, capsys):
    from stapo.cli import main
    from stapo.data import load_verl_parquet

    out = tmp_path / "out.parquet"
    assert main(["data", "convert", f"hf:{saved_dict}:test", str(out), "--problem-field", "q",
                 "--answer-field", "a"]) == 0  # fmt: skip
    assert [p.answer for p in load_verl_parquet(out)] == ["5"]
    assert main(["data", "convert", str(saved_dict), str(tmp_path / "x.parquet")]) == 2  # default fields absent
    err = capsys.readouterr().err
    assert err.startswith("stapo data convert: error: dataset ") and "has no field 'problem'" in err
    assert len(err.strip().splitlines()) == 1
