"""``python -m benchmarks animate``: an animated GIF of nbflash's forward pass, tile by tile.

Runs without a GPU. The steps are computed in NumPy (float64) the way
``reference/tiled.py::flash_forward`` and nbflash's forward kernel do them, on one
head of random data, with the tile sizes nbflash's kernel uses for the dtype and head
dim (``nbflash.config``; ``--block-m``/``--block-n`` override them). Each frame shows
Q, K, V and O with the tiles that sit on chip outlined, the block of scores being
computed (P = exp(S - m) of the current tile; earlier tiles are never stored, tiles
above the causal diagonal are skipped), the running max m and sum l of the current
query rows, the output filling in, and the bytes read from and written to GPU memory
so far, next to what standard attention moves. Saved to
``benchmarks/results/forward.gif`` by default.
"""
import argparse
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbflash import io_model
from reference.tiled import LN2, LOG2E, _apply_masks, _load_tile, key_tile_range

from . import common

DEFAULT_OUT = common.RESULTS / "forward.gif"


@dataclass
class Step:
    """The state after one stage of the forward pass of one head."""
    stage: str                      # 'load Q', 'K V tile' or 'write O'
    m_block: int
    n_block: int                    # -1 outside the key loop
    p: np.ndarray                   # P of the current tile, (block_m, block_n); empty if none
    m: np.ndarray                   # running max of the scaled scores, natural-log units
    l: np.ndarray                   # running sum of exp(scaled score - m)
    o_tile: np.ndarray              # current query tile's output so far, acc / l
    out: np.ndarray                 # output rows written to memory so far (NaN: not yet)
    hbm: dict                       # bytes read and written so far, by array


def _cdiv(a, b):
    return -(-a // b)


def forward_steps(q, k, v, block_m, block_n, causal=False, itemsize=2, lse_itemsize=4):
    """The forward pass of one head, ``q`` (seqlen_q, d), ``k``, ``v`` (seqlen_k, d), as a
    list of ``Step``; the last step's ``out`` is the attention output. Memory traffic
    counts the rows each load and store touches, in the input dtype (``itemsize``)."""
    (sq, d), sk = q.shape, k.shape[0]
    scale_log2 = LOG2E / math.sqrt(d)
    out = np.full((sq, d), np.nan)
    hbm = {"Q": 0, "K": 0, "V": 0, "O": 0, "lse": 0}
    steps = []

    def snap(stage, m_block, n_block, p, m, l, acc):
        o_tile = np.divide(acc, l[:, None], out=np.zeros_like(acc), where=l[:, None] > 0)
        steps.append(Step(stage, m_block, n_block, p, m * LN2, l.copy(), o_tile, out.copy(),
                          dict(hbm)))

    for m_block in range(_cdiv(sq, block_m)):
        m0 = m_block * block_m
        rows = min(block_m, sq - m0)
        q_i = _load_tile(q, m0, block_m)
        hbm["Q"] += rows * d * itemsize
        m, l, acc = np.full(block_m, -np.inf), np.zeros(block_m), np.zeros((block_m, d))
        snap("load Q", m_block, -1, np.empty((0, 0)), m, l, acc)
        for n_block in range(*key_tile_range(m_block, block_m, block_n, sq, sk, causal)):
            n0 = n_block * block_n
            k_j, v_j = _load_tile(k, n0, block_n), _load_tile(v, n0, block_n)
            hbm["K"] += min(block_n, sk - n0) * d * itemsize
            hbm["V"] += min(block_n, sk - n0) * d * itemsize
            s = _apply_masks((q_i @ k_j.T) * scale_log2, m0, n0, block_m, block_n, sq, sk, causal)
            m_new = np.maximum(m, s.max(axis=1))
            m_ref = np.where(np.isneginf(m_new), 0.0, m_new)
            alpha = np.exp2(m - m_ref)
            p = np.exp2(s - m_ref[:, None])
            l = alpha * l + p.sum(axis=1)
            acc = alpha[:, None] * acc + p @ v_j
            m = m_new
            snap("K V tile", m_block, n_block, p, m, l, acc)
        o_i = np.divide(acc, l[:, None], out=np.zeros_like(acc), where=l[:, None] > 0)
        out[m0:m0 + rows] = o_i[:rows]
        hbm["O"] += rows * d * itemsize
        hbm["lse"] += rows * lse_itemsize
        snap("write O", m_block, -1, np.empty((0, 0)), m, l, acc)
    return steps


@dataclass
class Scene:
    """What every frame shares: inputs, tiling, sizes and the totals to compare with."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block_m: int
    block_n: int
    causal: bool
    dtype: str
    shared_bytes: int               # on chip per block, from nbflash.config
    flash_bytes: int                # io_model: nbflash's total traffic for this head
    standard_bytes: int             # io_model: standard attention's (paper's 3 passes)


def _outline(ax, col, row, width, height, color, style="-"):
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((col - 0.5, row - 0.5), width, height, fill=False,
                           edgecolor=color, linewidth=2.2, linestyle=style))


def _matrix(ax, data, title, vmax):
    ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _scores_panel(ax, scene, steps, i):
    """The seqlen_q x seqlen_k scores: P of every tile computed so far (veiled once
    done: it was never stored), the current tile outlined, skipped tiles hatched."""
    from matplotlib.patches import Rectangle
    sq, sk, bm, bn = scene.q.shape[0], scene.k.shape[0], scene.block_m, scene.block_n
    canvas = np.full((sq, sk), np.nan)
    done = set()
    for s in steps[:i + 1]:
        if s.p.size:
            m0, n0 = s.m_block * bm, s.n_block * bn
            canvas[m0:m0 + bm, n0:n0 + bn] = s.p[:sq - m0, :sk - n0]
            done.add((s.m_block, s.n_block))
    ax.imshow(canvas, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    current = (steps[i].m_block, steps[i].n_block)
    for mb in range(_cdiv(sq, bm)):
        end = key_tile_range(mb, bm, bn, sq, sk, scene.causal)[1]
        for nb in range(_cdiv(sk, bn)):
            box = dict(xy=(nb * bn - 0.5, mb * bm - 0.5), width=min(bn, sk - nb * bn),
                       height=min(bm, sq - mb * bm), linewidth=0.5)
            if nb >= end:
                ax.add_patch(Rectangle(**box, facecolor="0.93", edgecolor="0.7", hatch="//"))
            elif (mb, nb) in done and (mb, nb) != current:
                ax.add_patch(Rectangle(**box, facecolor="white", alpha=0.6, edgecolor="0.6"))
            else:
                ax.add_patch(Rectangle(**box, fill=False, edgecolor="0.8"))
    if steps[i].p.size:
        _outline(ax, current[1] * bn, current[0] * bm, bn, bm, "red")
    ax.set_xlim(-0.5, sk - 0.5)
    ax.set_ylim(sq - 0.5, -0.5)
    ax.set_title("scores: P = exp(S - m) of each tile, never stored (hatched: skipped)",
                 fontsize=9)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    ax.tick_params(labelsize=7)


def _row_panel(ax, scene, step, values, title, xlim):
    """A per-row statistic (m or l) of the current query tile, rows aligned with S."""
    sq, bm = scene.q.shape[0], scene.block_m
    m0 = step.m_block * bm
    rows = np.arange(m0, min(m0 + bm, sq))
    shown = values[:len(rows)]
    finite = np.isfinite(shown)
    ax.barh(rows[finite], shown[finite], height=1.0, color="C1")
    ax.set_ylim(sq - 0.5, -0.5)
    ax.set_xlim(*xlim)
    ax.set_title(title, fontsize=9)
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    ax.axhspan(m0 - 0.5, m0 + bm - 0.5, color="red", alpha=0.06)


def _caption(scene, steps, i):
    step = steps[i]
    n_m = _cdiv(scene.q.shape[0], scene.block_m)
    n_end = key_tile_range(step.m_block, scene.block_m, scene.block_n, scene.q.shape[0],
                           scene.k.shape[0], scene.causal)[1]
    where = f"query tile {step.m_block + 1} of {n_m}"
    if step.stage == "load Q":
        return (f"{where}: load Q_i on chip; m = -inf, l = 0, O_i = 0 "
                f"({n_end} key tiles to visit)")
    if step.stage == "K V tile":
        return (f"{where}, key tile {step.n_block + 1} of {n_end}: load K_j, V_j; S = Q_i K_j^T; "
                "new m rescales l and O_i by exp(m_old - m_new); O_i += P V_j")
    return f"{where}: write O_i = O_i / l and lse = m + log l, once"


def _traffic_text(scene, step):
    h = step.hbm
    total = sum(h.values())
    kib = lambda n: f"{n / 1024:.1f} KiB"  # noqa: E731
    return "\n".join([
        "GPU memory (HBM) traffic so far",
        f"  read   Q {kib(h['Q'])}   K {kib(h['K'])}   V {kib(h['V'])}",
        f"  write  O {kib(h['O'])}   lse {kib(h['lse'])}",
        f"  total  {kib(total)}   (whole pass: {kib(scene.flash_bytes)})",
        f"standard attention: {kib(scene.standard_bytes)} "
        f"({scene.standard_bytes / scene.flash_bytes:.1f}x)",
        f"on chip per block: {kib(scene.shared_bytes)} shared memory",
        "red: on chip now; dashed O tile: not yet written",
    ])


def draw_frame(scene, steps, i, ranges):
    """One frame as a matplotlib figure."""
    from matplotlib.gridspec import GridSpec

    from .plots import pyplot
    plt = pyplot()
    step = steps[i]
    (sq, d), sk = scene.q.shape, scene.k.shape[0]
    bm, bn = scene.block_m, scene.block_n
    fig = plt.figure(figsize=(12, 7))
    gs = GridSpec(3, 5, figure=fig, width_ratios=[1, min(4, max(1, sk / d)), 0.45, 0.45, 1],
                  height_ratios=[0.55, 0.55, 2.6], hspace=0.35, wspace=0.12,
                  left=0.04, right=0.98, top=0.84, bottom=0.07)
    in_loop, loaded = step.p.size > 0, step.stage != "write O"
    ax = fig.add_subplot(gs[0, 1])
    _matrix(ax, scene.k.T, "K^T", ranges["qkv"])
    if in_loop:
        _outline(ax, step.n_block * bn, 0, bn, d, "red")
    ax = fig.add_subplot(gs[1, 1])
    _matrix(ax, scene.v.T, "V^T", ranges["qkv"])
    if in_loop:
        _outline(ax, step.n_block * bn, 0, bn, d, "red")
    ax = fig.add_subplot(gs[2, 0])
    _matrix(ax, scene.q, "Q", ranges["qkv"])
    if loaded:
        _outline(ax, 0, step.m_block * bm, d, bm, "red")
    _scores_panel(fig.add_subplot(gs[2, 1]), scene, steps, i)
    _row_panel(fig.add_subplot(gs[2, 2]), scene, step, step.m, "max m", ranges["m"])
    _row_panel(fig.add_subplot(gs[2, 3]), scene, step, step.l, "sum l", ranges["l"])
    ax = fig.add_subplot(gs[2, 4])
    out = step.out.copy()
    m0 = step.m_block * bm
    if loaded:
        out[m0:m0 + bm] = step.o_tile[:sq - m0]
    _matrix(ax, out, "O", ranges["o"])
    _outline(ax, 0, m0, d, bm, "red", "-" if not loaded else "--")
    fig.text(0.04, 0.97, f"nbflash forward, {scene.dtype}, seqlen {sq}, headdim {d}"
             f"{', causal' if scene.causal else ''}: tiles {bm} x {bn} (nbflash.config)",
             fontsize=11, weight="bold", va="top")
    fig.text(0.04, 0.925, _caption(scene, steps, i), fontsize=9.5, va="top")
    ax = fig.add_subplot(gs[0:2, 2:5])
    ax.axis("off")
    ax.text(0.02, 1.0, _traffic_text(scene, step), fontsize=8.5, va="top", family="monospace",
            transform=ax.transAxes)
    return fig


def value_ranges(scene, steps):
    """Fixed color and axis limits for all frames."""
    ms = np.concatenate([s.m[np.isfinite(s.m)] for s in steps] + [np.zeros(1)])
    return {"qkv": float(np.abs(np.concatenate([scene.q, scene.k, scene.v])).max()),
            "o": float(np.nanmax(np.abs(steps[-1].out))),
            "m": (min(0.0, float(ms.min())) * 1.1, float(ms.max()) * 1.1 + 1e-9),
            "l": (0.0, max(float(s.l.max()) for s in steps) * 1.1 + 1e-9)}


def render(scene, steps, path, dpi=72, ms_per_frame=700):
    """Writes the frames to ``path`` as a looping GIF; returns the number of frames."""
    from PIL import Image

    from .plots import pyplot
    plt = pyplot()
    ranges = value_ranges(scene, steps)
    frames = []
    for i in common.progress(range(len(steps)), "frames"):
        fig = draw_frame(scene, steps, i, ranges)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        plt.close(fig)
        frames.append(Image.open(buf).convert("RGB").convert("P", palette=Image.ADAPTIVE))
    durations = [ms_per_frame] * (len(frames) - 1) + [3 * ms_per_frame]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return len(frames)


def build(seqlen, headdim, dtype="float16", causal=False, block_m=None, block_n=None, seed=0):
    """(Scene, steps) for one head of random data with nbflash's tiling."""
    cfg = io_model.forward_config(dtype, headdim)
    if block_m or block_n:
        cfg = io_model.with_tiles(cfg, dtype, block_m, block_n)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((seqlen, headdim)) for _ in range(3))
    isz = io_model.itemsize(dtype)
    steps = forward_steps(q, k, v, cfg.block_m, cfg.block_n, causal, isz,
                          io_model.lse_itemsize(dtype))
    flash = io_model.flash_forward_io(1, 1, seqlen, seqlen, headdim, dtype_name=dtype,
                                      causal=causal, block_m=cfg.block_m, block_n=cfg.block_n)
    standard = io_model.standard_attention_io(1, 1, seqlen, seqlen, headdim, dtype_name=dtype)
    scene = Scene(q, k, v, cfg.block_m, cfg.block_n, causal, dtype,
                  io_model.shared_bytes_per_block(cfg, dtype), flash.sram.total, standard.total)
    return scene, steps


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks animate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", help="picks nbflash's tile configuration")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--block-m", type=int, help="query tile rows (default: nbflash's)")
    ap.add_argument("--block-n", type=int, help="key/value tile rows (default: nbflash's)")
    ap.add_argument("--ms-per-frame", type=int, default=700)
    ap.add_argument("--dpi", type=int, default=72)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    scene, steps = build(args.seqlen, args.headdim, args.dtype, args.causal, args.block_m,
                         args.block_n)
    n = render(scene, steps, args.out, args.dpi, args.ms_per_frame)
    print(f"wrote {args.out}: {n} frames, tiles {scene.block_m} x {scene.block_n}, "
          f"{sum(steps[-1].hbm.values())} bytes moved (standard attention: "
          f"{scene.standard_bytes})")
    return 0
