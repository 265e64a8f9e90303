"""Hyena's own pieces: the long convolution by FFT against the direct sum, filters that do not depend on
the input's length, its figures by hand, causality at a length where the FFT's noise would show, and bf16
(autocast, and weights in bf16 as FSDP computes)."""

from __future__ import annotations

import pytest
import torch
from causality import model_for

from distseq.distributed.sharding import as_fsdp_computes
from distseq.models.flops import matmul_params
from distseq.models.mixers.hyena import HyenaMixer, long_conv
from distseq.tasks import TaskSpec


def mixer(width: int = 8, order: int = 2, max_len: int = 64) -> HyenaMixer:
    torch.manual_seed(0)
    layer = HyenaMixer(width, order, filter_width=16, max_len=max_len)
    layer.initialize()
    return layer


def test_the_fft_convolution_equals_the_direct_sum_with_its_gradients():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 37, dtype=torch.float64, generator=generator)  # (B, C, T): T not a power of two
    h = torch.randn(5, 37, dtype=torch.float64, generator=generator)  # (C, T)
    bias = torch.randn(5, dtype=torch.float64, generator=generator)
    weights = torch.randn(3, 5, 37, dtype=torch.float64, generator=generator)
    results = []
    for slow in (False, True):
        inputs = [t.clone().requires_grad_() for t in (z, h, bias)]
        out = long_conv(*inputs, slow=slow)  # (B, C, T)
        (out * weights).sum().backward()
        results.append((out.detach(), [t.grad for t in inputs]))
    (fast, fast_grads), (slow, slow_grads) = results
    by_hand = sum(h[:, lag] * z[..., 36 - lag] for lag in range(37)) + bias * z[..., 36]  # (B, C): t = 36
    assert torch.allclose(slow[..., 36], by_hand, atol=1e-12)
    assert (fast - slow).abs().max() < 1e-6
    for fast_grad, slow_grad in zip(fast_grads, slow_grads):
        assert (fast_grad - slow_grad).abs().max() < 1e-6


def test_an_output_does_not_depend_on_how_long_the_input_is():
    layer = mixer(max_len=64).double()
    u = torch.randn(2, 64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(layer.filter(20), layer.filter(64)[..., :20], atol=1e-12)
    with torch.no_grad():
        short, long = layer(u[:, :20]), layer(u)  # (B, 20, D), (B, 64, D)
    assert torch.allclose(short, long[:, :20], atol=1e-12)


def test_a_sequence_longer_than_the_filters_is_refused():
    with pytest.raises(ValueError, match="longer than the filters made for --seq-len 16"):
        mixer(max_len=16)(torch.randn(1, 17, 8))


def test_figures_by_hand():
    layer = mixer(width=16, order=2, max_len=1024)
    # N D T + 2 (N + 1) D: the long convolutions' inputs, the short convolution's last two
    assert layer.state_size(1024) == 2 * 16 * 1024 + 2 * 3 * 16 == 32864
    # N D (10 log2(2T) + 8), log2(2 x 1024) = 11
    assert layer.mixing_flops(1024) == 2 * 16 * 118 == 3776
    assert layer.mixing_flops(32) == 2 * 16 * 68
    # in_proj 16 x 48, the short convolution 48 x 3, out_proj 16 x 16; the filter runs per sequence: not counted
    assert matmul_params(layer) == 768 + 144 + 256


def test_float32_outputs_before_a_change_stay_bit_identical_at_a_long_length():
    layer = mixer(max_len=512).eval()
    u = torch.randn(2, 512, 8, generator=torch.Generator().manual_seed(2))
    changed = u.clone()
    changed[:, 300] += 1.0
    with torch.no_grad():
        before, after = layer(u), layer(changed)
    assert torch.equal(before[:, :300], after[:, :300])
    assert not torch.equal(before[:, 300:], after[:, 300:])


def test_bf16_autocast_and_bf16_weights_run_forward_and_backward():
    """Whatever this CPU does with bf16, the model runs under autocast and with FSDP's bf16 weights:
    finite outputs and gradients, the filter still made in float32."""
    spec = TaskSpec(64, 64, 10, copy_len=3)
    model = model_for("hyena", "selective-copy", spec, num_layers=2, filter_width=16)
    x = torch.randint(0, 10, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)  # (B, T, C)
    logits.float().sum().backward()
    assert torch.isfinite(logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.mixers()[0].filter.mlp[0].weight.grad.abs().sum() > 0

    bf16 = as_fsdp_computes(model, torch.bfloat16)
    bf16(x).sum().backward()
    mixer_bf16 = bf16.mixers()[0]
    assert mixer_bf16.filter(64).dtype == torch.float32
    assert all(torch.isfinite(p.grad.float()).all() for p in bf16.parameters() if p.grad is not None)
