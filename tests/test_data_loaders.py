"""Data loaders, prompts and ``stapo data convert`` on small files written by the tests.

The real benchmark and training files are checked in test_data_real.py.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stapo.data import (
    BENCHMARKS,
    PLAIN_TEMPLATE,
    TEMPLATES,
    DataError,
    Problem,
    apply_template,
    build_prompt,
    load_benchmark,
    load_json,
    load_problems,
    load_verl_parquet,
    strip_template,
    write_verl_parquet,
)


def write_json(path, rows, lines=False):
    text = "\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows)
    path.write_text(text)
    return path


# ---- JSON / JSONL ---------------------------------------------------------------------------
def test_load_json_and_jsonl_with_configurable_fields(tmp_path):
    rows = [
        {"question": "1+1?", "solution": 2, "uid": "a", "level": 1},
        {"question": "Half?", "solution": 0.5, "uid": "b", "level": 2},
        {"question": "AMC?", "solution": 27.0, "uid": "c", "level": 3},
        {"question": "Both roots?", "solution": ["1", "3"], "uid": "d", "level": 4},
    ]
    for path in (
        write_json(tmp_path / "set.json", rows),
        write_json(tmp_path / "set.jsonl", rows, lines=True),
    ):
        ps = load_json(
            path, problem_field="question", answer_field="solution", id_field="uid", meta_fields=["level"]
        )
        assert [p.answer for p in ps] == ["2", "0.5", "27", ["1", "3"]]  # 27.0 -> "27"; a list is parts
        assert ps[0] == Problem(id="set/a", prompt="1+1?", answer="2", source="set", meta={"level": 1})
        assert ps[3].answer_parts == ["1", "3"] and ps[0].answer_parts == ["2"]


def test_load_json_errors_name_the_file_and_field(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(DataError, match=r"bad\.json: row 1 has no field 'answer'"):
        load_json(path)
    with pytest.raises(DataError, match=r"bad\.json: row 0 has no field 'question'"):
        load_json(path, problem_field="question")
    # present but null or empty: the row is left out and counted (absent, above, is an error)
    empty = write_json(tmp_path / "empty.json", [{"problem": "p", "answer": "  "}, {"problem": "q", "answer": "1"}])
    with pytest.warns(UserWarning, match=r"left out 1 rows with a null or empty 'problem' or 'answer': rows \[0\]"):
        assert [p.id for p in load_json(empty)] == ["empty/1"]
    with pytest.raises(DataError, match=r"empty\.json: row 0 field 'answer' is empty"):
        load_json(empty, on_missing="error")
    obj = tmp_path / "obj.json"
    obj.write_text('{"problem": "p"}')
    with pytest.raises(DataError, match="expected a JSON array"):
        load_json(obj)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2 is not valid JSON"):
        load_json(lines)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_json(tmp_path / "nothere.json")


# ---- verl parquet ---------------------------------------------------------------------------
def dapo_math_17k_rows():
    """Two rows in DAPO-Math-17k's exact schema (its prompt carries DAPO's template)."""
    questions = ["In triangle $ABC$, find $x$.", "Compute $\\frac{1}{2}+\\frac{1}{3}$."]
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": apply_template(q, "dapo"), "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": gt, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": idx},
        }
        for q, gt, idx in zip(questions, ["34", "5/6"], ["9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079", "b426d104"])
    ], questions


def test_load_dapo_math_17k_schema(tmp_path):
    rows, questions = dapo_math_17k_rows()
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ps = load_verl_parquet(path)
    assert [p.prompt for p in ps] == questions  # DAPO's template stripped back off
    assert [p.answer for p in ps] == ["34", "5/6"]
    assert ps[0].id == "math_dapo/9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079" and ps[0].source == "math_dapo"
    assert ps[0].meta["ability"] == "MATH" and ps[0].meta["reward_style"] == "rule-lighteval/MATH_v2"
    assert ps[0].meta["messages"] == rows[0]["prompt"]  # the original chat messages are kept
    assert load_problems(path)[1].answer == "5/6"  # dispatch by extension


def test_verl_parquet_errors(tmp_path):
    path = tmp_path / "noreward.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "q"}]}]), path)
    with pytest.raises(DataError, match=r"noreward\.parquet: no column 'reward_model'"):
        load_verl_parquet(path)
    path = tmp_path / "nogt.parquet"
    rows = [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "reward_model": {"style": "rule", "ground_truth": None},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.warns(UserWarning, match=r"nogt\.parquet: left out 1 rows with a null or empty 'prompt' or "
                                         r"'reward_model.ground_truth': rows \[0\]; 0 of 1 kept"):
        assert load_verl_parquet(path) == []
    path = tmp_path / "nouser.parquet"
    rows = [
        {
            "prompt": [{"role": "system", "content": "s"}],
            "reward_model": {"style": "rule", "ground_truth": "1"},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"nouser\.parquet: row 0 field 'prompt' has no user message"):
        load_verl_parquet(path)


def test_write_verl_parquet_round_trip_and_reads_in_datasets(tmp_path):
    problems = [
        Problem("s/0", "What is $1+1$?", "2", "s", {"level": 1, "solution": "1+1=\\boxed{2}"}),
        Problem("s/1", "Roots of $x^2-4x+3$?", ["1", "3"], "s", {}),
    ]
    path = write_verl_parquet(problems, tmp_path / "out" / "s.parquet")
    assert load_verl_parquet(path) == [
        Problem(p.id, p.prompt, p.answer, p.source, {**p.meta, "ability": "math", "reward_style": "rule",
                                                      "messages": [{"role": "user", "content": apply_template(p.prompt, "boxed")}]})
        for p in problems
    ]  # fmt: skip
    table = pq.read_table(path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    row = table.to_pylist()[1]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "1, 3"}  # a plain string for verl / TRL
    assert row["prompt"] == [
        {"role": "user", "content": "Roots of $x^2-4x+3$?\n\n" + TEMPLATES["boxed"].split("\n\n")[1]}
    ]
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds[0]["prompt"][0]["role"] == "user" and ds[0]["reward_model"]["ground_truth"] == "2"


# ---- benchmarks and presets from a data directory ----------------------------------------------
def fake_data_dir(tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir(parents=True)
    write_json(
        bench / "minerva_math.jsonl",
        [{"problem": "p", "solution": "so $\\boxed{1.6 \\mathrm{~cm}}$.", "idx": 0}],
        True,
    )
    olymp = [
        {
            "id": 7,
            "question": "q",
            "final_answer": ["$69$,$84$"],
            "is_multiple_answer": True,
            "context": None,
        },
        {
            "id": 8,
            "question": "q2",
            "final_answer": ["$(1,2)$"],
            "is_multiple_answer": False,
            "context": "ctx",
        },
    ]
    write_json(bench / "olympiadbench.jsonl", olymp, True)
    write_json(bench / "amc23.jsonl", [{"id": 0, "problem": "p", "answer": 27.0}], True)
    train = tmp_path / "train"
    train.mkdir()
    write_json(
        train / "math_train.json",
        [{"problem": "p", "answer": "3", "type": "Algebra"}, {"problem": "q", "answer": None}],
    )
    return tmp_path


def test_benchmark_schemas_and_data_dir(tmp_path, monkeypatch):
    data = fake_data_dir(tmp_path)
    monkeypatch.delenv("STAPO_DATA_DIR", raising=False)
    assert load_benchmark("amc23")[0].answer == "27" and len(load_benchmark("amc23")) == 40  # bundled
    with pytest.raises(DataError, match=r"no data directory for preset 'math_train'.*STAPO_DATA_DIR"):
        load_problems("math_train")
    monkeypatch.setenv("STAPO_DATA_DIR", str(data))
    assert len(load_benchmark("amc23")) == 1  # the data directory overrides the bundled sets
    assert load_benchmark("amc23")[0].answer == "27"
    assert load_benchmark("minerva")[0].answer == "1.6 \\mathrm{~cm}"  # last box of the solution
    o = load_benchmark("olympiadbench")
    assert o[0].answer == ["69", "84"] and o[0].id == "olympiadbench/7"  # multi-answer -> parts
    assert o[1].answer == "(1,2)" and o[1].prompt == "ctx\n\nq2"  # a tuple is one answer
    with pytest.raises(FileNotFoundError, match=r"benchmark 'aime24': file .*aime24\.jsonl not found .*bundled"):
        load_benchmark("aime24")
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k")
    with pytest.warns(UserWarning, match="left out 1 rows"):
        assert [p.id for p in load_problems("math_train")] == ["math_train/0"]
    assert set(BENCHMARKS) == {"aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"}
    with pytest.raises(FileNotFoundError, match="no such file or folder, and not hf:ORG/NAME, a preset"):
        load_problems("no_such_set")


def test_bundled_benchmarks_are_the_shared_files(shared_data_dir):
    """The package's copies are byte-for-byte the published sets (and their license)."""
    from stapo.data import BUNDLED_DIR

    shared = sorted(p.name for p in (shared_data_dir / "benchmarks").iterdir())
    assert sorted(p.name for p in BUNDLED_DIR.iterdir()) == shared
    for name in shared:
        assert (BUNDLED_DIR / name).read_bytes() == (shared_data_dir / "benchmarks" / name).read_bytes(), name


def test_minerva_without_box_is_an_error(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    write_json(tmp_path / "benchmarks" / "minerva_math.jsonl", [{"problem": "p", "solution": "no box"}], True)
    with pytest.raises(DataError, match=r"minerva_math\.jsonl: row 0 field 'solution' has no \\boxed"):
        load_benchmark("minerva", tmp_path)


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_convert(tmp_path, capsys):
    from stapo.cli import main

    src = write_json(tmp_path / "mine.jsonl", [{"q": "What is 2+2?", "a": 4}], lines=True)
    out = tmp_path / "mine.parquet"
    assert (
        main(
            [
                "data",
                "convert",
                str(src),
                str(out),
                "--problem-field",
                "q",
                "--answer-field",
                "a",
                "--template",
                "dapo",
            ]
        )
        == 0
    )
    assert "wrote 1 problems" in capsys.readouterr().out
    row = pq.read_table(out).to_pylist()[0]
    assert row["prompt"][0]["content"] == apply_template("What is 2+2?", "dapo")
    assert load_problems(out)[0].prompt == "What is 2+2?" and load_problems(out)[0].answer == "4"
    data = fake_data_dir(tmp_path / "d")
    with pytest.warns(UserWarning):
        assert (
            main(["data", "convert", "math_train", str(tmp_path / "t.parquet"), "--data-dir", str(data)]) == 0
        )
    assert load_verl_parquet(tmp_path / "t.parquet")[0].id == "math_train/0"


# ---- prompts -------------------------------------------------------------------------------------
def test_templates():
    q = "Find $x$ if $\\{x\\} = 1$."  # braces must survive (no str.format)
    assert (
        apply_template(q, "boxed")
        == q + "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert apply_template(q, "dapo") == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        + q
        + '\n\nRemember to put your answer on its own line after "Answer:".'
    )
    assert apply_template(q, "Q: {question}\nA:") == f"Q: {q}\nA:"
    with pytest.raises(ValueError, match="template 'boxd'"):
        apply_template(q, "boxd")
    for name in ("boxed", "dapo"):
        assert strip_template(apply_template(q, name)) == q
    assert strip_template("plain text") == "plain text"


def test_build_prompt_chat_and_plain():
    from stapo.models.tiny import train_tokenizer

    texts = ["Question: Answer: User: Assistant: What is 1+1? Please reason step by step boxed"]
    chat_tok = train_tokenizer(texts)
    plain_tok = train_tokenizer(texts, chat_template=False)
    p = Problem("t/0", "What is 1+1?", "2", "t")
    body = apply_template(p.prompt, "boxed")
    expected = chat_tok.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    assert (
        build_prompt(p, chat_tok) == expected == f"Question: {body}\nAnswer: "
    )  # the tokenizer's own template
    assert build_prompt(p, chat_tok, use_chat_template=False) == PLAIN_TEMPLATE.replace("{prompt}", body)
    assert build_prompt(p, plain_tok) == f"User: {body}\nAssistant:"  # no chat template: plain frame
    assert build_prompt(p) == build_prompt(p, plain_tok)
    assert build_prompt("What is 1+1?", chat_tok, template="dapo").startswith("Question: Solve the following")
    with pytest.raises(ValueError, match="no chat_template"):
        build_prompt(p, plain_tok, use_chat_template=True)
