"""Problems for training and evaluation: one record type, loaders for the formats in use, prompts.

problems = load_benchmark("math500")                     # bundled; data_dir= or $STAPO_DATA_DIR override
train = load_problems("math_train")                      # presets, .json/.jsonl, verl .parquet
train = load_problems("hf:ORG/NAME:train")               # hub id or dataset folder, via `datasets`
text = build_prompt(problems[0], tokenizer)              # "... within \\boxed{}." + chat template
"""

from .benchmarks import BENCHMARKS, BUNDLED_DIR, load_benchmark
from .loaders import (
    PRESETS,
    load_dataset_problems,
    load_json,
    load_problems,
    load_verl_parquet,
    rows_to_problems,
    write_verl_parquet,
)
from .problem import Problem
from .prompts import BOXED_SUFFIX, PLAIN_TEMPLATE, TEMPLATES, apply_template, build_prompt, strip_template
from .records import DataError, read_records, resolve_data_dir

__all__ = [
    "BENCHMARKS",
    "BOXED_SUFFIX",
    "BUNDLED_DIR",
    "PLAIN_TEMPLATE",
    "PRESETS",
    "TEMPLATES",
    "DataError",
    "Problem",
    "apply_template",
    "build_prompt",
    "load_benchmark",
    "load_dataset_problems",
    "load_json",
    "load_problems",
    "load_verl_parquet",
    "read_records",
    "resolve_data_dir",
    "rows_to_problems",
    "strip_template",
    "write_verl_parquet",
]
