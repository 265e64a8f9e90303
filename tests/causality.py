"""Building small models by name, and the perturb-the-future check that proves a model causal."""

from __future__ import annotations

import torch

from distseq.config import ModelConfig
from distseq.models import build_model
from distseq.registry import MODELS, TASKS
from distseq.tasks import TaskSpec


def model_for(kind: str, task: str, spec: TaskSpec, **model) -> torch.nn.Module:
    """``kind`` at width 16 (``hidden_size`` to change it), one layer, 2 heads where it has heads."""
    dropout = model.pop("dropout", 0.0)
    heads = {"num_heads": 2} if kind in MODELS.declared_options().get("num_heads", ()) else {}
    cfg = ModelConfig(kind=kind, hidden_size=model.pop("hidden_size", 16), num_layers=model.pop("num_layers", 1),
                      dropout=dropout, options={**heads, **model})
    torch.manual_seed(0)
    return build_model(cfg, TASKS[task], spec)


def assert_causal(model: torch.nn.Module, x: torch.Tensor, change) -> None:
    """For every position t: ``change(x, t)`` alters the input at t only; logits before t stay
    bit-identical, and some logit at t or later moves."""
    with torch.no_grad():
        base = model(x)  # (B, T, C)
        assert base.dim() == 3 and base.shape[:2] == x.shape[:2]
        for t in range(x.shape[1]):
            changed = model(change(x, t))
            assert torch.equal(changed[:, :t], base[:, :t]), f"position {t} changed an earlier logit"
            assert not torch.equal(changed[:, t:], base[:, t:]), f"position {t} changed nothing"


def change_token(vocab: int):
    def change(x, t):
        x = x.clone()
        x[:, t] = (x[:, t] + 1 + torch.arange(x.shape[0]) % (vocab - 1)) % vocab  # a different token in each row
        return x
    return change


def change_features(x, t):
    x = x.clone()
    x[:, t] = torch.randn(x.shape[0], x.shape[2], generator=torch.Generator().manual_seed(t))
    return x
