"""``--model decoder``: a causal decoder-only transformer (GPT-style), the model of token research.

The shared block stack (``stack.py``) with causal self-attention as its mixer
(``scaled_dot_product_attention(is_causal=True)``: PyTorch's fused kernels). Positions: rotary
(``--positions rope``, applied to queries and keys), learned or sinusoidal (added to the embedding).
``--tie-embeddings`` makes the output layer share the token embedding's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from distseq.errors import ConfigError
from distseq.models.attention import CausalSelfAttention
from distseq.models.base import register_model
from distseq.models.conv import MAX_SHORT_CONV, SHORT_CONV_HELP
from distseq.models.rotary import check_heads
from distseq.models.stack import stack_for
from distseq.options import MAX_WIDTH, option
from distseq.registry import TASKS
from distseq.tasks import Task, TaskSpec


@dataclass
class DecoderOptions:
    num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1, high=MAX_WIDTH)
    positions: Literal["sinusoidal", "learned", "rope"] = option(
        "sinusoidal", "position encoding: added to the embedding (sinusoidal, learned) or rotary (rope)")
    tie_embeddings: bool = option(False, "on a token task, the output layer shares the token embedding's weights")
    short_conv: int = option(0, SHORT_CONV_HELP, low=0, high=MAX_SHORT_CONV)


@register_model("decoder", options=DecoderOptions)
def decoder(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    # the mixer's attribute keeps the name release 0.1 saved its weights under
    return stack_for(cfg, task, spec, lambda: CausalSelfAttention(cfg.hidden_size, cfg.num_heads, cfg.dropout,
                                                                   spec.seq_len, cfg.positions == "rope",
                                                                   cfg.short_conv),
                     positions="none" if cfg.positions == "rope" else cfg.positions, tie=cfg.tie_embeddings,
                     mixer_name="attention")


def _decoder_validate(cfg) -> None:
    m = cfg.model
    check_heads(m.hidden_size, m.num_heads, m.positions == "rope", rotary_field="--positions")
    if m.tie_embeddings:
        task, spec = TASKS[cfg.data.task], cfg.task_spec()
        if not task.tokens or task.num_outputs(spec) != task.vocab(spec):
            raise ConfigError("--tie-embeddings", f"needs a token task whose outputs are its vocabulary "
                                                  f"({cfg.data.task} is not one)")


decoder.validate = _decoder_validate
