"""Small helpers the fused ops share."""

from __future__ import annotations

import torch

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Input dtypes the fused kernels take (float64 always runs the eager path)."""


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``triton.next_power_of_2`` without importing Triton).

    Example:
        >>> [next_power_of_2(n) for n in (1, 3, 4, 5)]
        [1, 4, 4, 8]
    """
    return 1 << max(n - 1, 0).bit_length()
