"""Based's own parts: the Taylor feature map, the chunked linear attention against its recurrence, its
figures by hand, and its validation. The generic mixer tests (causality, fast = slow, training) are in
test_mixers.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_main

from distseq.models.mixers.based import (
    BasedMixer,
    chunked_linear_attention,
    recurrent_linear_attention,
    taylor_features,
)


def test_feature_dot_products_are_the_second_order_taylor_expansion_of_exp():
    d = 5
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 7, d, dtype=torch.float64, generator=generator)  # 7 pairs
    a = (q * k).sum(-1) / math.sqrt(d)
    assert taylor_features(q).shape == (7, 1 + d + d * d)
    assert torch.allclose((taylor_features(q) * taylor_features(k)).sum(-1), 1 + a + a * a / 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_linear_attention_equals_the_recurrence_in_float64(chunk):
    generator = torch.Generator().manual_seed(chunk)
    B, H, T, d, Dh = 2, 2, 21, 4, 3
    inputs = [torch.randn(B, H, T, width, dtype=torch.float64, generator=generator, requires_grad=True)
              for width in (d, d, Dh)]  # q, k, v
    weights = torch.randn(B, H, T, Dh, dtype=torch.float64, generator=generator)
    results = []
    for form in (lambda q, k, v: chunked_linear_attention(q, k, v, chunk), recurrent_linear_attention):
        mixed = form(*inputs)  # (B, H, T, Dh)
        grads = torch.autograd.grad((mixed * weights).sum(), inputs)
        results.append((mixed.detach(), grads))
    (fast, fast_grads), (slow, slow_grads) = results
    assert fast.shape == (B, H, T, Dh)
    assert (fast - slow).abs().max() < 1e-6
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        assert (fast_grad - slow_grad).abs().max() < 1e-6


def test_state_size_and_mixing_flops_by_hand():
    mixer = BasedMixer(width=16, heads=4, feature_dim=4, window=8, max_len=64, feature_heads=2)
    features = 1 + 4 + 16  # 21
    # S (21 x 16) + z (21 x 2) + 2 conv inputs (2 x 16) + the window's keys and values (2 x 16 x 8)
    assert mixer.state_size(64) == 336 + 42 + 32 + 256 == 666
    assert mixer.state_size(5) == 336 + 42 + 32 + 2 * 16 * 5  # a window longer than the sequence
    # feature maps 2 x 2 heads x 16, update 2 x 21 x 16 + 21 x 2, read-out 2 x 21 x 16 + 2 x 21 x 2,
    # window 4 x 16 x 8
    assert mixer.mixing_flops(64) == 64 + (672 + 42) + (672 + 84) + 512 == 2046
    assert features == mixer.linear.features


def test_one_linear_attention_head_by_default_as_zoology_runs_based():
    mixer = BasedMixer(width=16, heads=4, feature_dim=4, window=8, max_len=64)
    assert mixer.linear.heads == 1 and mixer.window.heads == 4
    assert mixer.linear.state_size(64) == 21 * 16 + 21 + 2 * 16


@pytest.mark.parametrize("width,flag,heads,message", [
    ("16", "--num-heads", "3", "--num-heads: 3 does not divide --hidden-size 16"),
    ("18", "--num-heads", "2", "--num-heads: rotary positions rotate pairs of dimensions: --hidden-size / "
                               "--num-heads = 9 must be even"),
    ("16", "--feature-heads", "3", "--feature-heads: 3 does not divide --hidden-size 16"),
])
def test_heads_that_do_not_fit_the_width_are_one_line(width, flag, heads, message, tmp_path):
    proc = run_main(["train", "--model", "based", "--hidden-size", width, "--num-heads", "2", flag, heads,
                     "--run-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
