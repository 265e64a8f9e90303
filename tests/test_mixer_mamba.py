"""Mamba-2's own parts: the chunked state space against its step-by-step recurrence, the float32 core
under autocast, its initialisation and figures by hand, its validation, and a few steps of learning. The
generic mixer tests (causality, fast = slow through the whole model, training) are in test_mixers.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from causality import model_for
from conftest import run_main

from distseq.models.mixers.mamba import Mamba2Mixer, in_float32, ssd_chunked, ssd_steps
from distseq.registry import TASKS
from distseq.tasks.base import spec_for


def ssd_inputs(generator: torch.Generator, b: int = 2, T: int = 21, H: int = 3, P: int = 4, N: int = 5):
    """x, dt, A, B, C in float64, as the mixer makes them: dt > 0, A < 0, decays from fast to slow."""
    x = torch.randn(b, T, H, P, dtype=torch.float64, generator=generator)
    dt = F.softplus(torch.randn(b, T, H, dtype=torch.float64, generator=generator) - 1)
    A = -torch.linspace(0.5, 8.0, H, dtype=torch.float64)
    B, C = torch.randn(2, b, T, N, dtype=torch.float64, generator=generator)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_state_space_equals_the_recurrence_in_float64(chunk):
    generator = torch.Generator().manual_seed(chunk)
    inputs = ssd_inputs(generator)
    weights = torch.randn(2, 21, 3, 4, dtype=torch.float64, generator=generator)
    results = []
    for form in (lambda *t: ssd_chunked(*t, chunk=chunk), ssd_steps):
        y = form(*inputs)  # (b, T, H, P)
        grads = torch.autograd.grad((y * weights).sum(), inputs)  # x, dt, A, B, C
        results.append((y.detach(), grads))
    (fast, fast_grads), (slow, slow_grads) = results
    assert fast.shape == (2, 21, 3, 4) and fast.dtype == torch.float64
    assert (fast - slow).abs().max() < 1e-6
    for name, fast_grad, slow_grad in zip("x dt A B C".split(), fast_grads, slow_grads):
        assert slow_grad.abs().sum() > 0, name
        assert (fast_grad - slow_grad).abs().max() < 1e-6 * max(1.0, slow_grad.abs().max()), name


def test_the_core_runs_in_float32_outside_autocast_and_answers_in_the_input_dtype():
    seen = []

    def core(*tensors):
        seen.append(([t.dtype for t in tensors], torch.is_autocast_enabled("cpu")))
        return tensors[0] * 2

    x = torch.ones(2, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = in_float32(core, x, torch.ones(3))
    assert seen == [([torch.float32, torch.float32], False)] and y.dtype == torch.bfloat16
    assert in_float32(core, x.double(), torch.ones(3)).dtype == torch.float64  # float64 stays float64
    assert seen[-1][0] == [torch.float64, torch.float64]


def test_initial_decays_and_step_sizes_lie_in_their_ranges():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(width=64, state_dim=16, expand=2, head_dim=8)  # 16 heads
    rates, steps = mixer.A_log.exp(), F.softplus(mixer.dt_bias)
    assert rates.shape == steps.shape == (16,)
    assert rates.min() >= 1 and rates.max() <= 16
    assert steps.min() >= 1e-3 * (1 - 1e-6) and steps.max() <= 1e-1 * (1 + 1e-6)
    assert torch.equal(mixer.D, torch.ones(16)) and torch.equal(mixer.norm_weight, torch.ones(128))


def test_state_size_and_mixing_flops_by_hand():
    mixer = Mamba2Mixer(width=24, state_dim=8, expand=2, head_dim=12, conv_kernel=4)  # E = 48, N = 8, 4 heads
    # the 48 x 8 state, and the convolution's last 3 inputs of x (48), B (8) and C (8)
    assert mixer.state_size(100) == mixer.state_size(10_000) == 384 + 3 * 64 == 576
    # decay 48 x 8, write 2 x 48 x 8, read 2 x 48 x 8, skip 48
    assert mixer.mixing_flops(100) == 384 + 768 + 768 + 48 == 1968
    # z, x (48 each), B, C (8 each), one step size per head (4)
    assert mixer.in_proj.weight.shape == (48 + 48 + 8 + 8 + 4, 24)


def test_a_head_dim_that_does_not_divide_the_inner_width_is_one_line(tmp_path):
    proc = run_main(["train", "--model", "mamba", "--hidden-size", "16", "--head-dim", "7",
                     "--run-dir", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"])
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert "--head-dim: 7 does not divide --expand x --hidden-size = 32 (choose from 1, 2, 4, 8, 16, 32)" in err
    assert not (tmp_path / "run").exists()


def test_a_few_steps_on_one_mqar_batch_lower_the_loss():
    task = TASKS["mqar"]
    spec = spec_for("mqar", 16, vocab_size=16, num_kv_pairs=2)
    batch = task.make(torch.Generator().manual_seed(0), 32, spec)
    model = model_for("mamba", "mqar", spec, num_layers=2)
    for mixer in model.mixers():
        mixer.chunk = 8  # two chunks of 8 positions
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = task.loss(model(batch["x"]), batch["y"]).mean()  # (B,) -> mean
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
