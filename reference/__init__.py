"""NumPy reference implementations (test oracles) for nbflash.

* ``reference.attention``: exact float64 attention forward/backward and the
  same-precision "naive" baseline used to judge kernel error.
* ``reference.tiled``: the FlashAttention-2 tiled algorithm in NumPy (float64).
"""

from .attention import (
    attention,
    attention_backward,
    attention_backward_magnitudes,
    causal_mask,
    naive_attention,
    tf32_round,
    naive_attention_backward,
)
from .tiled import flash_backward, flash_forward, key_tile_range, query_tile_range

__all__ = [
    "attention",
    "attention_backward",
    "attention_backward_magnitudes",
    "causal_mask",
    "naive_attention",
    "tf32_round",
    "naive_attention_backward",
    "flash_forward",
    "flash_backward",
    "key_tile_range",
    "query_tile_range",
]
