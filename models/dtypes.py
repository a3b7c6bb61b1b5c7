"""Floating-point dtypes by name: the one table behind every setting that names one.

Settings spell a dtype two ways: Hugging Face's long names for weights (`hf.dtype: bfloat16`)
and the loop's short ones for autocast (`train.precision: bf16`; the seeds' `amp_dtype` takes
either). Both read this table."""
from __future__ import annotations

import torch

# (dtype, long name, short name)
_NAMED = ((torch.float32, "float32", "fp32"), (torch.bfloat16, "bfloat16", "bf16"), (torch.float16, "float16", "fp16"))

DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, *names in _NAMED for name in names}


def short_name(name: str) -> str | None:
    """`bfloat16`, `bf16` or `torch.bfloat16` -> `bf16`; None for a name that is no dtype here."""
    dtype = DTYPES.get(str(name).removeprefix("torch."))
    return next((short for d, _, short in _NAMED if d == dtype), None)
