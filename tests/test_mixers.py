"""The sequence mixers (sliding-window, based, hyena, mamba), each proven the same way:

- causal: changing a future token never changes an earlier logit (bit-exact), through the chunked or
  FFT paths (chunks smaller than the sequence, a sequence that is not a multiple of them);
- fast form = slow reference in float64 to 1e-6, the logits and the gradient of every parameter;
- figures: parameters, FLOPs per token and the recurrent state size in summary.json and the log;
- real training under DDP and FSDP on two processes at --seq-len 2,048 (bf16 where the probe allows).
"""

from __future__ import annotations

import json

import pytest
import torch
from causality import assert_causal, change_token, model_for
from conftest import run_main, summary
from test_sharding import torchrun

from distseq.models.flops import flops_per_token, matmul_params, state_size
from distseq.tasks import TaskSpec
from distseq.training.precision import cpu_has_native_bf16

MIXERS = ("sliding-window", "based", "hyena", "mamba")
SPEC = TaskSpec(21, 21, 10, copy_len=3)  # selective-copy: any 21 ids in [0, 10) are valid inputs
# options that make every fast path cut the 21 positions into several pieces, the last one short
SMALL_PIECES = {"sliding-window": {"window": 4, "short_conv": 3}, "based": {"window": 4}, "hyena": {}, "mamba": {}}
CHUNK = 4  # a chunked mixer's chunk length in these tests



def small_model(kind: str, layers: int = 2, **options) -> torch.nn.Module:
    model = model_for(kind, "selective-copy", SPEC, num_layers=layers, **{**SMALL_PIECES[kind], **options})
    for mixer in model.mixers():
        if hasattr(mixer, "chunk"):
            mixer.chunk = CHUNK
    return model


@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_is_causal(kind):
    model = small_model(kind).eval()
    x = torch.randint(0, 10, (3, SPEC.seq_len), generator=torch.Generator().manual_seed(1))
    assert_causal(model, x, change_token(10))


@pytest.mark.parametrize("kind", MIXERS)
def test_fast_form_equals_the_slow_reference_in_float64(kind):
    torch.manual_seed(0)
    fast = small_model(kind).double().train()
    slow = small_model(kind).double().train()
    slow.load_state_dict(fast.state_dict())
    for mixer in slow.mixers():
        mixer.slow = True
    x = torch.randint(0, 10, (3, SPEC.seq_len), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(3, SPEC.seq_len, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for name, model in (("fast", fast), ("slow", slow)):
        logits = model(x)  # (B, T, C)
        (logits * weights).sum().backward()
        outputs[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    (fast_logits, fast_grads), (slow_logits, slow_grads) = outputs["fast"], outputs["slow"]
    assert (fast_logits - slow_logits).abs().max() < 1e-6
    assert fast_grads.keys() == slow_grads.keys()
    for name, grad in fast_grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} has no gradient"
        assert (grad - slow_grads[name]).abs().max() < 1e-6 * max(1.0, slow_grads[name].abs().max()), name


@pytest.mark.parametrize("kind", MIXERS)
def test_figures_of_a_mixer_are_its_own(kind):
    """FLOPs per token are 6 per token weight plus 3 x the mixers' own forward FLOPs; the state size is
    the one layer's, and it does not grow with the sequence unless the mixer keeps every token."""
    model = small_model(kind, layers=2)
    mixers = model.mixers()
    assert flops_per_token(model, 21) == 6 * matmul_params(model) + 3 * sum(m.mixing_flops(21) for m in mixers)
    assert all(m.mixing_flops(21) > 0 for m in mixers)
    assert state_size(model, 21) == mixers[0].state_size(21) > 0
    grows = state_size(model, 4096) > state_size(model, 2048)
    assert grows == (kind == "hyena")  # a window or a fixed state does not grow; an implicit long filter does


@pytest.mark.parametrize("kind, options", [("decoder", {}), ("sliding-window", {"window": 4})])
def test_a_short_convolution_before_attention_keeps_it_causal_and_is_counted(kind, options):
    """--short-conv (Zoology's convolution in front of the mixer): causal; one depthwise filter of 3 taps per
    channel and layer more weights, and its last 2 inputs more state per layer."""
    plain = model_for(kind, "selective-copy", SPEC, num_layers=2, **options)
    conv = model_for(kind, "selective-copy", SPEC, num_layers=2, short_conv=3, **options).eval()
    x = torch.randint(0, 10, (3, SPEC.seq_len), generator=torch.Generator().manual_seed(4))
    assert_causal(conv, x, change_token(10))
    assert matmul_params(conv) == matmul_params(plain) + 2 * 16 * 3
    assert state_size(conv, 21) == state_size(plain, 21) + 2 * 16


def test_attention_state_grows_with_the_sequence_and_a_window_caps_it():
    attention = model_for("decoder", "selective-copy", SPEC)
    window = small_model("sliding-window", window=4, short_conv=0)
    assert state_size(attention, 100) == 2 * 16 * 100 and state_size(attention, 200) == 2 * 16 * 200
    assert state_size(window, 100) == state_size(window, 200) == 2 * 16 * 4


@pytest.mark.parametrize("kind", MIXERS)
def test_training_reports_the_figures(kind, tmp_path):
    run = tmp_path / "run"
    proc = run_main(["train", "--preset", "mqar", "--model", kind, "--hidden-size", "16", "--seq-len", "32",
                     "--num-kv-pairs", "4", "--vocab-size", "32", "--global-batch-size", "8", "--max-steps", "2",
                     "--eval-size", "16", "--eval-every", "0", "--log-every", "1", "--run-dir", str(run),
                     "--no-progress", "--log-with", "none", "--checkpoint-every", "0"])
    assert proc.returncode == 0, proc.stderr
    out = summary(run)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["kind"] == kind
    assert out["parameters"] > 0 and out["flops_per_token"] > 0 and out["state_size_per_layer"] > 0
    assert (f"parameters={out['parameters']} flops/token={out['flops_per_token']:.3g} "
            f"state/layer={out['state_size_per_layer']}") in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", MIXERS)
def test_mixer_trains_on_two_processes_under_ddp_and_fsdp_at_seq_2048(kind, tmp_path):
    losses = {}
    for sharding in ("ddp", "fsdp"):
        run = tmp_path / sharding
        proc = torchrun(2, ["train", "--preset", "mqar", "--model", kind, "--hidden-size", "16", "--num-layers", "2",
                            "--seq-len", "2048", "--num-kv-pairs", "8", "--global-batch-size", "2",
                            "--max-steps", "2", "--eval-size", "4", "--eval-every", "2", "--log-every", "1",
                            "--sharding", sharding, "--precision", "auto", "--run-dir", str(run), "--no-progress",
                            "--log-with", "none", "--checkpoint-every", "2", "--expect-world-size", "2"],
                        timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = summary(run)
        assert out["world_size"] == 2 and out["sharding"] == sharding and out["step"] == 2
        # --precision auto: bf16 on a CPU with native bf16 when the probe's forward+backward runs (every mixer's
        # must), fp32 on one without
        assert out["precision"] == ("bf16" if cpu_has_native_bf16() else "no"), proc.stdout
        if sharding == "fsdp":
            assert "distseq: fsdp: 2 block(s) + root sharded over 2 process(es)" in proc.stdout + proc.stderr
        losses[sharding] = out["eval/loss"]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses.values())
