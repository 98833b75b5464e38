"""The one dtype vocabulary of every command: ``model.dtype`` (train) and ``--dtype`` (eval).

The names are torch's, and ``auto``; the short spellings are read as them everywhere:

    bf16 = bfloat16    fp16 = float16    fp32 = float32

What ``auto`` means is the command's: training loads the checkpoint's own dtype
(``from_pretrained(dtype="auto")``); eval picks bf16 on a GPU that has it, else fp32.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Literal, get_args

from .schema import Aliases

DTYPE_ALIASES = Aliases(bf16="bfloat16", fp16="float16", fp32="float32")
Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], DTYPE_ALIASES]
DTYPES: tuple[str, ...] = get_args(get_args(Dtype)[0])
SPELLINGS = "auto, bf16|bfloat16, fp16|float16, fp32|float32"


def canonical_dtype(name: str) -> str:
    """``bf16`` -> ``bfloat16`` and so on; a name already canonical is returned as is."""
    name = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {SPELLINGS}")
    return name


def dtype_argument(text: str) -> str:
    """``argparse`` ``type=`` for a ``--dtype`` flag: the canonical name, or a usage error."""
    try:
        return canonical_dtype(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def torch_dtype(name: str):
    """The ``torch.dtype`` of ``name`` (any spelling); ``auto`` stays ``"auto"`` (from_pretrained's own)."""
    import torch

    name = canonical_dtype(name)
    return "auto" if name == "auto" else getattr(torch, name)
