"""The attention implementations the benchmarks compare, behind one interface.

A peer turns CuPy inputs ``(q, k, v, dout)`` of shape (batch, seqlen, heads, headdim)
into its own arguments once (``prepare``, not timed) and then runs a forward
(``forward``) or a forward and backward (``forward_backward``) on them. All peers
share the inputs' memory: torch sees the CuPy arrays through DLPack, as
(batch, heads, seqlen, headdim) ``transpose(1, 2)`` views, nothing is copied.

Peers: ``nbflash``; ``nbflash-tf32`` (float32 only: ``allow_tf32=True``); ``naive`` (CuPy attention that materialises the scores, in the
input dtype); ``torch-flash``, ``torch-cudnn``, ``torch-efficient``, ``torch-math``
(PyTorch's ``scaled_dot_product_attention`` pinned to one backend with
``torch.nn.attention.sdpa_kernel``) when torch is importable.
"""
import contextlib
import functools
import math
import warnings
from dataclasses import dataclass

TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-cudnn": "CUDNN_ATTENTION",
                  "torch-efficient": "EFFICIENT_ATTENTION", "torch-math": "MATH"}
PEERS = ("nbflash", "nbflash-tf32", "naive", *TORCH_BACKENDS)


@dataclass(frozen=True)
class Problem:
    """One attention call: shapes, dtype name and masking (seqlen_q == seqlen_k)."""
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    dtype: str = "float16"
    causal: bool = False
    nheads_k: int = 0          # 0: as many kv heads as query heads

    @property
    def kv_heads(self):
        return self.nheads_k or self.nheads

    @property
    def q_shape(self):
        return (self.batch, self.seqlen, self.nheads, self.headdim)

    @property
    def kv_shape(self):
        return (self.batch, self.seqlen, self.kv_heads, self.headdim)

    def label(self):
        gqa = f", {self.kv_heads} kv heads" if self.kv_heads != self.nheads else ""
        return (f"{self.dtype} b{self.batch} s{self.seqlen} h{self.nheads}{gqa} "
                f"d{self.headdim}{' causal' if self.causal else ''}")


def numpy_dtype(name):
    """The NumPy dtype for a dtype name; bfloat16 is ``ml_dtypes.bfloat16``."""
    import numpy as np
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def from_float32(x, dtype_name):
    """CuPy float32 array ``x`` in dtype ``dtype_name``, converted on the GPU. bfloat16
    is rounded to nearest even with integer operations, which need no bfloat16 kernels."""
    import cupy
    if dtype_name != "bfloat16":
        return x.astype(dtype_name)
    u = x.view(cupy.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)
    return bits.view(numpy_dtype("bfloat16"))


def to_float32(x):
    """CuPy array ``x`` as float32, converted on the GPU (bfloat16 by its bits)."""
    import cupy
    if x.dtype.name != "bfloat16":
        return x.astype(cupy.float32)
    return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)


def random_inputs(problem, seed):
    """CuPy ``(q, k, v, dout)``, standard normal, in the problem's dtype."""
    import cupy
    rng = cupy.random.default_rng(seed)
    shapes = (problem.q_shape, problem.kv_shape, problem.kv_shape, problem.q_shape)
    return tuple(from_float32(rng.standard_normal(s, dtype=cupy.float32), problem.dtype)
                 for s in shapes)


def naive_forward_backward(cupy, q, k, v, dout, causal):
    """Plain attention forward and backward in the inputs' dtype, scores materialised:
    returns ``(out, dq, dk, dv)``. Grouped-query heads share repeated K and V, whose
    gradients are summed back per kv head."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = h // hk
    scale = 1.0 / math.sqrt(d)
    qh, doh = (x.transpose(0, 2, 1, 3) for x in (q, dout))
    kh, vh = (cupy.repeat(x.transpose(0, 2, 1, 3), group, axis=1) if group > 1
              else x.transpose(0, 2, 1, 3) for x in (k, v))
    s = cupy.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    if causal:
        s = cupy.where(cupy.tri(sq, sk, k=sk - sq, dtype=bool), s, -cupy.inf).astype(
            s.dtype, copy=False)
    p = cupy.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = cupy.matmul(p, vh)
    dv = cupy.matmul(p.transpose(0, 1, 3, 2), doh)
    dp = cupy.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - (doh * out).sum(axis=-1, keepdims=True))
    dq = cupy.matmul(ds, kh) * scale
    dk = cupy.matmul(ds.transpose(0, 1, 3, 2), qh) * scale

    def per_kv_head(x):    # (b, h, sk, d) -> (b, sk, hk, d)
        if group > 1:
            x = x.reshape(b, hk, group, sk, d).sum(axis=2)
        return x.transpose(0, 2, 1, 3)

    return out.transpose(0, 2, 1, 3), dq.transpose(0, 2, 1, 3), per_kv_head(dk), per_kv_head(dv)


class _CupyPeer:
    """A peer that runs on the CuPy arrays as they are."""

    def __init__(self, problem):
        self.causal = problem.causal

    def context(self):
        return contextlib.nullcontext()

    def prepare(self, q, k, v, dout, grad):
        return q, k, v, dout


class NbflashPeer(_CupyPeer):
    """``nbflash.attention`` and ``nbflash.attention_backward``."""
    name = "nbflash"

    def forward(self, q, k, v, dout):
        import nbflash
        return nbflash.attention(q, k, v, causal=self.causal)

    def forward_backward(self, q, k, v, dout):
        import nbflash
        out, lse = nbflash.attention(q, k, v, causal=self.causal, return_lse=True)
        return nbflash.attention_backward(dout, q, k, v, out, lse, causal=self.causal)


class NbflashTf32Peer(_CupyPeer):
    """``nbflash.attention(..., allow_tf32=True)`` (float32), and the backward."""
    name = "nbflash-tf32"

    def forward(self, q, k, v, dout):
        import nbflash
        return nbflash.attention(q, k, v, causal=self.causal, allow_tf32=True)

    def forward_backward(self, q, k, v, dout):
        import nbflash
        out, lse = nbflash.attention(q, k, v, causal=self.causal, return_lse=True,
                                     allow_tf32=True)
        return nbflash.attention_backward(dout, q, k, v, out, lse, causal=self.causal,
                                          allow_tf32=True)


class NaivePeer(_CupyPeer):
    """Attention that materialises the scores, in CuPy (``nbflash._naive``)."""
    name = "naive"

    def forward(self, q, k, v, dout):
        import cupy
        from nbflash._naive import naive_attention
        return naive_attention(cupy, q, k, v, self.causal)

    def forward_backward(self, q, k, v, dout):
        import cupy
        return naive_forward_backward(cupy, q, k, v, dout, self.causal)


def to_torch(x):
    """A torch tensor sharing the memory of CuPy array ``x``. bfloat16 goes through
    DLPack directly when CuPy and torch agree on it, else as its 16 raw bits."""
    import torch
    if x.dtype.name != "bfloat16":
        return torch.from_dlpack(x)
    try:
        t = torch.from_dlpack(x)
        if t.dtype == torch.bfloat16:
            return t
    except (TypeError, ValueError, RuntimeError, BufferError):
        pass
    import cupy
    return torch.from_dlpack(x.view(cupy.uint16)).view(torch.bfloat16)


class TorchPeer:
    """``torch.nn.functional.scaled_dot_product_attention`` pinned to one backend."""

    def __init__(self, problem, name):
        import torch
        from torch.nn.attention import SDPBackend
        self.name = name
        self.backend = getattr(SDPBackend, TORCH_BACKENDS[name])
        self.causal = problem.causal
        self.gqa = problem.kv_heads != problem.nheads
        self.torch = torch

    @contextlib.contextmanager
    def context(self):
        """Pins the backend and silences the warnings torch gives when it cannot run."""
        from torch.nn.attention import sdpa_kernel
        with warnings.catch_warnings(), sdpa_kernel(self.backend):
            warnings.simplefilter("ignore")
            yield

    def prepare(self, q, k, v, dout, grad):
        """(batch, heads, seqlen, headdim) views; leaves that want gradients if ``grad``."""
        leaves = [to_torch(x).detach().requires_grad_(grad) for x in (q, k, v)]
        return (*leaves, to_torch(dout))

    def _attend(self, q, k, v):
        f = self.torch.nn.functional.scaled_dot_product_attention
        extra = {"enable_gqa": True} if self.gqa else {}
        return f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                 is_causal=self.causal, **extra)

    def forward(self, q, k, v, dout):
        return self._attend(q, k, v)

    def forward_backward(self, q, k, v, dout):
        out = self._attend(q, k, v)
        return self.torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))


@functools.lru_cache(maxsize=None)
def torch_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_peers(problem, names):
    """The peers called ``names`` for ``problem``; torch peers are left out (with the
    reason in the second value) when torch is not importable."""
    peers, missing = [], {}
    for name in names:
        if name == "nbflash":
            peers.append(NbflashPeer(problem))
        elif name == "nbflash-tf32":
            if problem.dtype == "float32":
                peers.append(NbflashTf32Peer(problem))
            else:
                missing[name] = "allow_tf32 concerns float32 inputs only"
        elif name == "naive":
            peers.append(NaivePeer(problem))
        elif torch_available():
            peers.append(TorchPeer(problem, name))
        else:
            missing[name] = "torch with CUDA is not importable"
    return peers, missing
