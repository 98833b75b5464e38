"""``stapo data convert IN OUT``: any supported input -> verl-schema parquet.

IN is a file (``.json``, ``.jsonl``, ``.parquet``), a dataset folder, ``hf:ORG/NAME[:split]``, a preset
(``math_train``, ``aime_1983_2023``) or a benchmark name; the output feeds verl, TRL (``datasets.load_dataset("parquet", ...)``) and stapo.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="data utilities (convert to verl parquet)")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    convert = sub.add_parser("convert", help="write any supported input as verl-schema parquet")
    convert.add_argument(
        "input",
        metavar="IN",
        help="file (.json/.jsonl/.parquet), dataset folder, hf:ORG/NAME[:split], preset or benchmark name",
    )
    convert.add_argument("output", metavar="OUT", help="output .parquet path")
    convert.add_argument("--problem-field", default="problem", help="JSON field with the question")
    convert.add_argument("--answer-field", default="answer", help="JSON field with the gold answer")
    convert.add_argument("--id-field", default=None, help="JSON field with a row id (default: row index)")
    convert.add_argument("--source", default=None, help="data_source to record (default: file stem)")
    convert.add_argument(
        "--data-dir",
        default=None,
        help="folder with train/ (presets) or benchmarks/ (default: $STAPO_DATA_DIR)",
    )
    convert.add_argument(
        "--template", default="boxed", help="instruction template in the user message: boxed, dapo, none"
    )
    convert.add_argument("--limit", type=int, default=None, help="first N rows only")
    convert.set_defaults(func=convert_cmd)


def convert_cmd(args) -> int:
    """Bad input (a missing file or field, an unreachable hub id, an output that cannot be written) is
    one line on stderr, exit status 2."""
    import sys

    try:
        return _convert(args)
    except (ValueError, FileNotFoundError) as err:  # DataError is a ValueError
        print(f"stapo data convert: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _convert(args) -> int:
    from pathlib import Path

    from .loaders import load_problems, write_verl_parquet
    from .records import DataError

    json_fields = {"problem_field": args.problem_field, "answer_field": args.answer_field}
    if (
        Path(args.input).suffix in (".json", ".jsonl")
        or args.input.startswith("hf:")
        or Path(args.input).is_dir()
    ):
        json_fields |= {"id_field": args.id_field, "source": args.source}
    problems = load_problems(args.input, data_dir=args.data_dir, limit=args.limit, **json_fields)
    try:
        path = write_verl_parquet(problems, args.output, template=args.template)
    except OSError as err:  # a parent that is a file, a read-only folder, a full disk
        raise DataError(f"OUT {args.output}: cannot write it: {err.strerror or err}"
                        + (f" ({err.filename})" if err.filename else "")) from None
    print(f"wrote {len(problems)} problems to {path}")
    return 0
