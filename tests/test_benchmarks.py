"""The parts of the benchmarks that need no GPU: the IO model against hand counts,
the FLOP formula, Nsight Compute output parsing, timing arithmetic, the forward-pass
animation, and the one-line exit of the GPU commands on a machine without one."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
from benchmarks import backward, common, hbm, speed, timing
from benchmarks.animate import build, forward_steps, render
from nbflash import config, io_model
from reference.tiled import key_tile_range as reference_key_tile_range

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


# ---------------------------------------------------------------- IO model

def test_flash_io_non_causal_by_hand():
    # 1 head, seqlen 256, headdim 64, float16, 64 x 64 tiles: 4 query tiles, each
    # reading all 256 rows of K and of V.
    f = io_model.flash_forward_io(1, 1, 256, 256, 64, block_m=64, block_n=64)
    row = 64 * 2
    assert f.sram.read == 256 * row + 4 * 2 * 256 * row
    assert f.sram.write == 256 * row + 256 * 4          # O, and float32 lse
    assert f.dram.read == 3 * 256 * row                 # Q, K, V once
    assert f.dram.write == f.sram.write
    assert f.kv_fits_l2


def test_flash_io_causal_skips_tiles_above_the_diagonal():
    # Query tile i visits key tiles 0..i: 64 + 128 + 192 + 256 rows of K and of V.
    f = io_model.flash_forward_io(1, 1, 256, 256, 64, causal=True, block_m=64, block_n=64)
    assert f.sram.read == 256 * 128 + 2 * (64 + 128 + 192 + 256) * 128


def test_flash_io_partial_tiles_read_only_real_rows():
    # seqlen 100, 64-row tiles: 2 query tiles, each reads the 100 rows of K and V.
    f = io_model.flash_forward_io(1, 1, 100, 100, 32, dtype_name="float32",
                                  block_m=64, block_n=64)
    row = 32 * 4
    assert f.sram.read == 100 * row + 2 * 2 * 100 * row
    assert f.sram.write == 100 * row + 100 * 4


def test_flash_io_grouped_query_heads():
    # 4 query heads over 2 kv heads: every query head streams its K, V (SRAM level);
    # DRAM reads each kv head once.
    f = io_model.flash_forward_io(2, 4, 128, 128, 64, nheads_k=2, block_m=64, block_n=64)
    row = 128
    assert f.sram.read == 2 * 4 * 128 * row + 2 * 4 * (2 * 2 * 128 * row)
    assert f.dram.read == 2 * 4 * 128 * row + 2 * 2 * 2 * 128 * row


@pytest.mark.parametrize("sq, sk, bm, bn, causal", [
    (256, 256, 64, 64, False), (300, 200, 64, 32, True), (200, 300, 16, 64, True),
    (1, 77, 64, 64, True), (77, 1, 16, 16, True), (130, 130, 128, 16, True)])
def test_key_rows_read_matches_the_tiled_reference(sq, sk, bm, bn, causal):
    expected = []
    for m_block in range(-(-sq // bm)):
        start, end = reference_key_tile_range(m_block, bm, bn, sq, sk, causal)
        expected.append(sum(min(bn, sk - n * bn) for n in range(start, end)))
    np.testing.assert_array_equal(io_model.key_rows_read(sq, sk, bm, bn, causal), expected)


def test_flash_io_matches_measured_flashattention2_dram_traffic():
    # Measured on an H100, PyTorch's FlashAttention-2 forward, batch 4, 16 heads,
    # seqlen 4096, headdim 128, float16: 210 MB read, 75 MB written from DRAM.
    f = io_model.flash_forward_io(4, 16, 4096, 4096, 128, block_m=128, block_n=64)
    assert f.kv_fits_l2
    assert f.dram.read == pytest.approx(210 * MB, rel=0.1)
    assert f.dram.write == pytest.approx(75 * MB, rel=0.1)


def test_dram_waves_when_kv_does_not_fit_l2():
    # A tiny L2: K, V come from DRAM once per wave of blocks for each head it holds.
    tiny = io_model.Gpu(sms=1, l2_bytes=1024, shared_bytes_per_sm=1, max_threads_per_sm=1)
    kw = dict(block_m=64, block_n=64, gpu=tiny)
    once = io_model.flash_forward_io(1, 2, 512, 512, 64, blocks_in_flight=10**6, **kw)
    waves = io_model.flash_forward_io(1, 2, 512, 512, 64, blocks_in_flight=4, **kw)
    one_by_one = io_model.flash_forward_io(1, 2, 512, 512, 64, blocks_in_flight=1, **kw)
    q = 2 * 512 * 128
    kv_once = 2 * 2 * 512 * 128
    assert not waves.kv_fits_l2
    assert once.dram.read == q + kv_once                  # one wave holds everything
    assert waves.dram.read == q + 2 * kv_once             # 8 tiles per head, waves of 4
    assert one_by_one.dram.read == one_by_one.sram.read   # no sharing at all


def test_flash_io_follows_theorem_2_with_an_sram_budget():
    # Tiles from an SRAM of M elements (B_c = ceil(M / 4d), B_r = min(B_c, d)): while
    # B_r < d, doubling M halves the K, V traffic, Theta(N^2 d^2 / M).
    n, d = 4096, 128
    kv = [io_model.flash_forward_io(1, 1, n, n, d, sram_bytes=m).sram.read - n * d * 2
          for m in (16 * 1024, 32 * 1024)]
    assert io_model.paper_block_sizes(16 * 1024, d, 2) == (16, 16)
    assert kv[0] == 2 * kv[1] == 2 * (n // 32) * 2 * n * d * 2


def test_standard_attention_io_by_hand():
    b, h, n, d = 2, 3, 64, 16
    s, q = b * h * n * n * 2, b * h * n * d * 2       # one float16 score matrix; Q (= K = V)
    # The paper's Algorithm 0: S written, read; P written, read; Q, K, V read, O written.
    assert io_model.standard_attention_io(b, h, n, n, d) == io_model.Traffic(2 * s + 3 * q,
                                                                             2 * s + q)


def test_naive_attention_io_counts_what_cupy_launches():
    b, h, n, d = 2, 3, 64, 16
    s, q = b * h * n * n * 2, b * h * n * d * 2
    # float16: CuPy's matmul works in float32, so S and P each make a float32 round trip:
    # reads  S32->16 2, scale 1, max 1, sub 1, exp 1, sum 1, div 1, P->32 1, P V 2 = 11 s;
    # writes Q K^T 2, S32->16 1, scale 1, sub 1, exp 1, div 1, P->32 2           =  9 s;
    # Q, K, V: astype copies (3 R, 3 W), repeat k, v (2, 2), operands Q, K to float32
    # (2, 4), Q K^T reads them (4), V to float32 (1, 2), P V reads it (2) and writes
    # O32 (2), O to float16 (2, 1).
    half = io_model.naive_attention_io(b, h, n, n, d)
    assert half == io_model.Traffic(11 * s + 16 * q, 9 * s + 14 * q)
    # float32: no casts; V and P are used in place.
    s, q = 2 * s, 2 * q
    single = io_model.naive_attention_io(b, h, n, n, d, dtype_name="float32")
    assert single == io_model.Traffic(7 * s + 10 * q, 5 * s + 8 * q)
    causal = io_model.naive_attention_io(b, h, n, n, d, dtype_name="float32", causal=True)
    assert causal == single + io_model.Traffic(s + n * n, s + n * n)


def test_model_uses_nbflash_tile_configuration():
    cfg = io_model.forward_config("float16", 100)
    f = io_model.flash_forward_io(1, 1, 512, 512, 100)
    assert (f.block_m, f.block_n) == (cfg.block_m, cfg.block_n)
    if "float16" in getattr(config, "MMA_DTYPES", ()):
        assert cfg == config.select_forward_mma(100)
    simt = io_model.forward_config("float32", 64)
    assert simt == config.select_forward("float32", 64)
    small = io_model.with_tiles(cfg, "float16", block_m=16)
    assert small.block_m == 16 and small.block_n == cfg.block_n


# ---------------------------------------------------------------- FLOPs, timing

def test_flop_formula():
    fwd = 4 * 8 * 16 * 2048 * 2048 * 128
    assert speed.attention_flops(8, 16, 2048, 2048, 128, False, "fwd") == fwd
    assert speed.attention_flops(8, 16, 2048, 2048, 128, True, "fwd") == fwd / 2
    assert speed.attention_flops(8, 16, 2048, 2048, 128, False, "bwd") == 2.5 * fwd
    assert speed.attention_flops(8, 16, 2048, 2048, 128, True, "fwd_bwd") == 3.5 * fwd / 2


def test_standard_grid():
    args = speed.parse_args([])
    grid = speed.problems(args)
    assert len(grid) == 6 * 2 * 2 * 2
    for p in grid:
        assert p.batch * p.seqlen == 16384 and p.nheads * p.headdim == 2048
    quick = speed.parse_args(["--quick", "--headdims", "64"])
    assert quick.seqlens == speed.QUICK["seqlens"] and quick.headdims == [64]


def test_speed_runs_merge_by_point(tmp_path):
    def row(dtype, seqlen, ms):
        return {"dtype": dtype, "headdim": 64, "causal": False, "seqlen": seqlen, "batch": 1,
                "nheads": 32, "nheads_k": 32, "pass": "fwd", "peers": {"nbflash": {"ms": ms}}}

    path = tmp_path / "speed.json"
    common.write_json(path, {"config": {"dtypes": ["float16"]}, "host_overhead": [],
                             "rows": [row("float16", 512, 1.0), row("float16", 1024, 2.0)]},
                      with_gpu=False)
    out = speed.merged(path, {"config": {"dtypes": ["bfloat16"]}, "host_overhead": [],
                              "rows": [row("bfloat16", 512, 3.0), row("float16", 1024, 4.0)]})
    got = {(r["dtype"], r["seqlen"]): r["peers"]["nbflash"]["ms"] for r in out["rows"]}
    assert got == {("float16", 512): 1.0, ("float16", 1024): 4.0, ("bfloat16", 512): 3.0}
    assert out["earlier_runs"][0]["config"] == {"dtypes": ["float16"]}
    assert speed.merged(tmp_path / "absent.json", {"rows": []}) == {"rows": []}


def test_timing_arithmetic():
    assert timing.input_sets_needed(256 * 2**20, 50 * 2**20) == 2
    assert timing.input_sets_needed(2**20, 50 * 2**20) == 8
    assert timing.calls_within(probe_ms=1.0, repeats=20, budget_s=5) == 20
    assert timing.calls_within(probe_ms=2000.0, repeats=20, budget_s=5) == 2
    assert timing.calls_within(probe_ms=9000.0, repeats=20, budget_s=5) == 1


# ---------------------------------------------------------------- Nsight Compute output

NCU_CSV = """==PROF== Connected to process 1 (python)
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1","python","h","nbflash_io_mark_0","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"1","1","python","h","forward_mma","1","7","(128, 1, 1)","(64, 16, 4)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","201,326,592"
"1","1","python","h","forward_mma","1","7","(128, 1, 1)","(64, 16, 4)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","68.16"
"1","1","python","h","forward_mma","1","7","(128, 1, 1)","(64, 16, 4)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","1500"
"2","1","python","h","nbflash_io_mark_1","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"3","1","python","h","gemm","1","7","(256, 1, 1)","(8, 8, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","1000"
"4","1","python","h","exp","1","7","(256, 1, 1)","(8, 8, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","2000"
"""


def test_ncu_csv_is_summed_per_job():
    kernels = hbm.parse_ncu_csv(NCU_CSV)
    assert [k["id"] for k in kernels] == [0, 1, 2, 3, 4]
    jobs = hbm.per_job(kernels)
    assert jobs[0]["dram__bytes_read.sum"] == 201326592
    assert jobs[0]["dram__bytes_write.sum"] == pytest.approx(68.16e6)
    assert jobs[0]["gpu__time_duration.sum"] == 1.5e6
    assert jobs[0]["kernels"] == 1
    assert jobs[1]["dram__bytes_read.sum"] == 3000 and jobs[1]["kernels"] == 2


def test_io_rows_and_tables_from_measurements():
    jobs = hbm.seqlen_jobs([1024], 16384, ["nbflash", "naive"])
    counters = {"dram__bytes_read.sum": 1e8, "dram__bytes_write.sum": 5e7,
                "lts__t_bytes.sum": 2e9, "lts__t_sectors_srcunit_tex_op_read.sum": 5e7,
                "lts__t_sectors_srcunit_tex_op_write.sum": 1e6,
                "gpu__time_duration.sum": 2e6, "kernels": 1}
    rows = hbm.rows_for(jobs, {0: counters, 1: "OutOfMemoryError: out of memory"})
    assert rows[0]["measured"]["ms"] == 2.0 and rows[1]["measured"]["skipped"]
    assert rows[0]["measured"]["sram_read"] == 32 * 5e7
    text = hbm.table(rows, "seqlen")
    assert "| nbflash | 1024 | 16 |" in text and "OutOfMemoryError" in text


def test_markdown_and_slug():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"


# ---------------------------------------------------------------- animation

def test_animation_steps_compute_attention_and_count_traffic():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((50, 16)) for _ in range(3))
    for causal in (False, True):
        steps = forward_steps(q, k, v, 16, 32, causal)
        out, _ = reference.attention(q[None, :, None], k[None, :, None], v[None, :, None],
                                     causal=causal)
        np.testing.assert_allclose(steps[-1].out, out[0, :, 0], rtol=1e-10, atol=1e-12)
        model = io_model.flash_forward_io(1, 1, 50, 50, 16, causal=causal, block_m=16,
                                          block_n=32)
        hbm_ = steps[-1].hbm
        assert hbm_["Q"] + hbm_["K"] + hbm_["V"] == model.sram.read
        assert hbm_["O"] + hbm_["lse"] == model.sram.write


def test_animate_writes_a_gif_with_frames(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    scene, steps = build(seqlen=32, headdim=16, block_m=16, block_n=16, causal=True)
    path = tmp_path / "forward.gif"
    n = render(scene, steps, path, dpi=40)
    with Image.open(path) as gif:
        assert gif.n_frames == n > 1


# ---------------------------------------------------------------- commands without a GPU

def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(common.gpu_unavailable() is None, reason="a GPU is present: would run")
@pytest.mark.parametrize("command", ["speed", "backward", "memory", "resources"])
def test_gpu_commands_exit_with_one_line_without_gpu(command):
    proc = _run(command)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0]


def test_io_prints_predictions_without_measuring():
    proc = _run("io", "--predict-only", "--seqlens", "1024", "4096")
    assert proc.returncode == 0, proc.stderr
    assert "| nbflash | 1024 | 16 |" in proc.stdout and "predictions only" in proc.stdout


def test_unknown_command_prints_usage():
    proc = _run()
    assert proc.returncode == 2 and "animate" in proc.stdout


def test_driver_swaps_nbflash_tile_sizes_and_restores_them():
    from benchmarks.io_driver import tile_sizes
    before = io_model.forward_config("float16", 128)
    with tile_sizes("float16", block_m=32, block_n=16):
        inside = io_model.forward_config("float16", 128)
        assert (inside.block_m, inside.block_n) == (32, 16)
        assert config.select_forward("float32", 64, False).block_n == 16
    assert io_model.forward_config("float16", 128) == before


def test_backward_benchmark_selects_each_configuration_and_restores_the_table():
    labels = [label for label, _ in backward.configurations(128, None)]
    assert labels[0] == "table" and len(labels) == 1 + len(backward.CANDIDATES[128])
    before = config.select_backward_mma(100)
    for label, cfg in backward.configurations(100, ["64,64,4,2,2,2"]):
        with backward.selected(cfg):
            assert config.select_backward_mma(100) == cfg
    assert config.select_backward_mma(100) == before
    rows = [dict(headdim=128, seqlen=4096, causal=False, peer="table", ms=2.0, tflops=100.0),
            dict(headdim=128, seqlen=4096, causal=False, peer="torch-flash", ms=1.0,
                 tflops=200.0)]
    assert "| d128 | full | 4096 | table | 100 (0.50x) |" in backward.table(rows)
