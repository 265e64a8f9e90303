"""Every task: labels follow the documented rule, recomputed from the inputs; lengths and padding behave."""

import pytest
import torch

from distseq.config import ModelConfig
from distseq.data.stream import SampleSource
from distseq.models import build_model
from distseq.registry import TASKS
from distseq.tasks import IGNORE, TaskSpec

FIXED = TaskSpec(seq_len=12, min_seq_len=12, vocab_size=5, copy_len=3)
VARIABLE = TaskSpec(seq_len=12, min_seq_len=3, vocab_size=5, copy_len=3)


def draw(task, spec, n=4000, seed=0):
    return SampleSource(task, spec, seed=seed, block_size=512).samples(torch.arange(n))


@pytest.mark.parametrize("task", sorted(name for name in TASKS if not TASKS[name].tokens))  # tokens: test_token_tasks
def test_labels_are_recomputable_from_inputs(task):
    for spec in (FIXED, VARIABLE) if task != "copy" else (FIXED,):
        batch = draw(task, spec)
        features = TASKS[task].num_features(spec)
        assert batch["x"].shape == (4000, 12, features) and batch["x"].dtype == torch.float32
        assert torch.equal(batch["y"], TASKS[task].label(batch["x"], batch.get("lengths"), spec))
        if spec.variable:
            pad = torch.arange(12)[None, :] >= batch["lengths"][:, None]  # (n, T)
            assert (batch["x"][pad] == 0).all() and pad.any()  # padding is zero
        else:
            assert "lengths" not in batch


def test_variable_lengths_cover_the_range():
    lengths = draw("sum-sign", VARIABLE)["lengths"]
    assert lengths.min().item() == 3 and lengths.max().item() == 12
    assert "lengths" not in draw("sum-sign", FIXED)


def test_sum_sign_rule_by_hand():
    batch = draw("sum-sign", VARIABLE)
    for x, length, y in zip(batch["x"][:50], batch["lengths"][:50], batch["y"][:50]):
        assert y.item() == float(x[: int(length), 0].sum().item() > 0)
    assert 0.45 < batch["y"].mean().item() < 0.55


def test_parity_rule_by_hand():
    batch = draw("parity", VARIABLE)
    assert set(batch["x"].unique().tolist()) == {0.0, 1.0}
    for x, length, y in zip(batch["x"][:50], batch["lengths"][:50], batch["y"][:50]):
        assert y.item() == int(x[: int(length), 0].sum().item()) % 2


def test_adding_rule_by_hand():
    batch = draw("adding", VARIABLE)
    marks = batch["x"][..., 1]
    assert torch.equal(marks.sum(1), torch.full((4000,), 2.0))  # exactly two marks
    for x, length, y in zip(batch["x"][:50], batch["lengths"][:50], batch["y"][:50]):
        where = x[:, 1].nonzero().flatten().tolist()
        half = int(length) // 2
        assert where[0] < half <= where[1] < int(length)  # one mark in each half of the valid part
        assert y.item() == pytest.approx(x[where[0], 0].item() + x[where[1], 0].item())


def test_copy_rule_by_hand():
    batch = draw("copy", FIXED)
    tokens = batch["x"].argmax(-1)  # (n, T)
    assert (tokens[:, 3:8] == 0).all() and (tokens[:, 8] == 6).all()  # blanks, then the delimiter V+1
    assert (batch["y"][:, :9] == IGNORE).all()
    assert torch.equal(batch["y"][:, 9:], tokens[:, :3] - 1)  # recall the symbols, classes 0..V-1


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm", "bi-gru", "transformer"])
def test_padding_never_changes_a_samples_logits(kind):
    torch.manual_seed(0)
    spec = VARIABLE
    own = {"num_heads": 2} if kind == "transformer" else {"bidirectional": kind.startswith("bi-")}
    config = ModelConfig(kind=kind.removeprefix("bi-"), hidden_size=8, num_layers=2, options=own)
    model = build_model(config, TASKS["sum-sign"], spec).eval()
    batch = draw("sum-sign", spec, n=16)
    with torch.no_grad():
        together = model(batch["x"], batch["lengths"])  # (16,)
        for i in range(16):
            length = int(batch["lengths"][i])
            alone = model(batch["x"][i : i + 1, :length])  # the same sample, unpadded, no lengths
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-6)
