"""Problems for training and evaluation: one record type, loaders for the formats in use, prompts.

problems = load_benchmark("math500", data_dir)          # or $STAPO_DATA_DIR
train = load_problems("math_train")                      # presets, .json/.jsonl, verl .parquet
text = build_prompt(problems[0], tokenizer)              # "... within \\boxed{}." + chat template
"""

from .benchmarks import BENCHMARKS, load_benchmark
from .loaders import (
    PRESETS,
    DataError,
    load_json,
    load_problems,
    load_verl_parquet,
    read_records,
    resolve_data_dir,
    write_verl_parquet,
)
from .problem import Problem
from .prompts import BOXED_SUFFIX, PLAIN_TEMPLATE, TEMPLATES, apply_template, build_prompt, strip_template

__all__ = [
    "BENCHMARKS",
    "BOXED_SUFFIX",
    "PLAIN_TEMPLATE",
    "PRESETS",
    "TEMPLATES",
    "DataError",
    "Problem",
    "apply_template",
    "build_prompt",
    "load_benchmark",
    "load_json",
    "load_problems",
    "load_verl_parquet",
    "read_records",
    "resolve_data_dir",
    "strip_template",
    "write_verl_parquet",
]
