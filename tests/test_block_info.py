"""Loop bounds (nbflash/block_info.py) and configuration tables, against brute force.

Pure Python: no kernels, no GPU.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbflash import block_info, config


def visible(seqlen_q, seqlen_k, causal):
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    mask = np.ones((seqlen_q, seqlen_k), bool)
    return mask & (j <= i + seqlen_k - seqlen_q) if causal else mask


def tile(mask, m, n, bm, bn):
    return mask[m * bm:(m + 1) * bm, n * bn:(n + 1) * bn]


shapes = dict(seqlen_q=st.integers(1, 300), seqlen_k=st.integers(0, 300),
              bm=st.sampled_from([16, 32, 64, 128]), bn=st.sampled_from([16, 32, 64, 128]),
              causal=st.booleans())


@settings(max_examples=200, deadline=None)
@given(**shapes)
def test_key_tile_range_visits_exactly_the_tiles_with_visible_keys(seqlen_q, seqlen_k, bm, bn,
                                                                   causal):
    mask = visible(seqlen_q, seqlen_k, causal)
    for m in range(-(-seqlen_q // bm)):
        start, end = block_info.key_tile_range(m, bm, bn, seqlen_q, seqlen_k, causal)
        needed = [n for n in range(-(-seqlen_k // bn)) if tile(mask, m, n, bm, bn).any()]
        # Every tile with a visible key is visited; skipped tiles are only ones without.
        assert set(needed) <= set(range(start, end))
        if needed:
            assert end - 1 == max(needed)


@settings(max_examples=200, deadline=None)
@given(**shapes)
def test_query_tile_range_visits_exactly_the_tiles_that_see_a_key(seqlen_q, seqlen_k, bm, bn,
                                                                 causal):
    mask = visible(seqlen_q, seqlen_k, causal)
    for n in range(-(-seqlen_k // bn)):
        start, end = block_info.query_tile_range(n, bm, bn, seqlen_q, seqlen_k, causal)
        needed = [m for m in range(-(-seqlen_q // bm)) if tile(mask, m, n, bm, bn).any()]
        assert set(needed) <= set(range(start, end))
        if needed:
            assert start == min(needed)


@settings(max_examples=200, deadline=None)
@given(**shapes)
def test_tile_needs_mask_exactly_when_a_pair_is_masked(seqlen_q, seqlen_k, bm, bn, causal):
    # Rows past seqlen_q are never written, so only real rows count; keys past
    # seqlen_k (the last, partial tile) must be masked.
    mask = visible(seqlen_q, seqlen_k, causal)
    for m in range(-(-seqlen_q // bm)):
        for n in range(-(-max(seqlen_k, 1) // bn)):
            rows = tile(mask, m, n, bm, bn)
            partial = (n + 1) * bn > seqlen_k
            masked_pair = partial or not rows.all()
            needs = block_info.tile_needs_mask(m, n, bm, bn, seqlen_q, seqlen_k, causal)
            if masked_pair and rows.shape[0] == bm:
                assert needs
            if needs is False:
                assert not partial and rows.all()


@pytest.mark.parametrize("dtype", list(config.STORAGE))
@pytest.mark.parametrize("bucket", config.HEAD_DIM_BUCKETS)
def test_every_configuration_fits(dtype, bucket):
    for simulator in (False, True):
        f = config.select_forward(dtype, bucket, simulator)
        b = config.select_backward(dtype, bucket, simulator)
        config.check_fits(f, config.forward_shared_elements(f), dtype)
        config.check_fits(b, config.backward_shared_elements(b), dtype)
        if dtype in config.MMA_DTYPES:
            for cfg in (config.select_forward_mma(bucket, simulator),
                        config.select_forward_mma(bucket, simulator, causal=True)):
                cfg.check()
                assert cfg.head_dim == bucket
            backward = config.select_backward_mma(bucket, simulator)
            backward.check_backward()
            assert backward.head_dim == bucket


def test_head_dim_buckets():
    assert [config.head_dim_bucket(d) for d in (1, 32, 33, 64, 65, 96, 97, 128, 129, 256)] == \
        [32, 32, 64, 64, 96, 96, 128, 128, 256, 256]
    with pytest.raises(ValueError, match="head_dim"):
        config.head_dim_bucket(257)
