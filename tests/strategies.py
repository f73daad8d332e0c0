"""Hypothesis strategies for attention problems, and builders for their inputs."""
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}
LAYOUTS = ("contiguous", "heads_major", "padded", "reversed", "packed")


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads_k: int
    group: int
    head_dim: int
    causal: bool
    softmax_scale: float | None
    layout: str
    input_scale: float
    seed: int
    deterministic: bool = False     # attention_backward's mode (the forward ignores it)

    @property
    def nheads(self):
        return self.nheads_k * self.group


def _seqlen(max_len):
    # Lengths of 1, exact tile multiples and their neighbours are where bugs hide.
    edges = [1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]
    return st.one_of(st.sampled_from([e for e in edges if e <= max_len]),
                     st.integers(1, max_len))


#: Head dims (GPU) where bugs hide: bucket edges, odd and padded sizes.
HEAD_DIM_EDGES = [1, 8, 17, 32, 33, 64, 65, 80, 96, 97, 128, 129, 160, 192, 256]


@st.composite
def cases(draw, simulator, head_dims=None):
    """An attention problem; ``head_dims`` = (lo, hi) narrows the head dim (on a GPU,
    to one kernel bucket, so that a test process compiles that bucket's kernels only)."""
    if simulator:
        max_len, max_dim, max_batch, max_heads, max_group = 40, 24, 2, 2, 2
        head_dim = st.integers(1, max_dim)
    else:
        max_len, max_dim, max_batch, max_heads, max_group = 300, 256, 3, 3, 3
        lo, hi = head_dims or (1, max_dim)
        head_dim = st.one_of(st.sampled_from([d for d in HEAD_DIM_EDGES if lo <= d <= hi]),
                             st.integers(lo, hi))
    seqlen_q = draw(_seqlen(max_len))
    seqlen_k = draw(st.one_of(st.just(seqlen_q), _seqlen(max_len)))
    nheads_k = draw(st.integers(1, max_heads))
    group = draw(st.integers(1, max_group))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "packed" and seqlen_q != seqlen_k:
        layout = "padded"
    return Case(
        batch=draw(st.integers(1, max_batch)), seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        nheads_k=nheads_k, group=group, head_dim=draw(head_dim), causal=draw(st.booleans()),
        softmax_scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))), layout=layout,
        input_scale=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
        # On a GPU, deterministic mode is checked against the default mode (bitwise
        # reproducible, equal up to dq's summation order) in test_reliability.py:
        # drawing it here would double the backward kernels each GPU worker compiles.
        deterministic=draw(st.booleans()) if simulator else False)


def _layout(host, xp, layout, rng):
    """``host`` (B, S, H, D) as an array of xp with the given memory layout."""
    b, s, h, d = host.shape
    if layout == "contiguous":
        return xp.asarray(host)
    if layout == "heads_major":      # a (B, H, S, D) array seen through a transpose
        return xp.ascontiguousarray(xp.asarray(host).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if layout == "padded":           # rows longer than the head dim (a slice)
        big = xp.asarray(np.zeros((b, s, h, d + 3), host.dtype) + host.dtype.type(7))
        big[..., :d] = xp.asarray(host)
        return big[..., :d]
    if layout == "reversed":         # negative stride on the sequence axis
        return xp.ascontiguousarray(xp.asarray(host[:, ::-1]))[:, ::-1]
    raise ValueError(layout)


def make_inputs(case, dtype_name, xp, with_grad=False):
    """Random q, k, v (and dout) as host arrays and as device arrays in case.layout."""
    rng = np.random.default_rng(case.seed)
    dtype = DTYPES[dtype_name]

    def randn(shape):
        return (rng.standard_normal(shape) * case.input_scale).astype(dtype)

    q = randn((case.batch, case.seqlen_q, case.nheads, case.head_dim))
    k = randn((case.batch, case.seqlen_k, case.nheads_k, case.head_dim))
    v = randn((case.batch, case.seqlen_k, case.nheads_k, case.head_dim))
    host = [q, k, v]
    if case.layout == "packed" and case.group == 1:
        # One (B, S, 3, H, D) array; q, k, v are slices of it.
        packed = xp.asarray(np.stack([q, k, v], axis=2))
        device = [packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]]
    else:
        layout = "padded" if case.layout == "packed" else case.layout
        device = [_layout(x, xp, layout, rng) for x in host]
    if with_grad:
        dout = randn(q.shape)
        host.append(dout)
        device.append(_layout(dout, xp, "contiguous", rng))
    return host, device
