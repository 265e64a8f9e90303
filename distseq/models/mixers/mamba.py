"""``--model mamba``: a Mamba-2 selective state space (SSD) as the mixer, in plain PyTorch.

Each layer widens the width D to E = ``--expand`` x D inner channels, split into H = E / ``--head-dim``
heads of P channels. One projection gives, per token, a gate z (E), inputs x (E), a write vector B and a
read vector C (``--state-size`` N each, shared by every head) and a step size per head; x, B and C pass
a causal depthwise convolution (``--conv-kernel`` taps) and SiLU. With dt = softplus(dt + dt_bias) and a
fixed negative rate A = -exp(A_log) per head, each head keeps a (P, N) state
h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T and reads y_t = h_t C_t + D x_t: the decay and the write depend
on the token (selective), so a head can keep a key for long or forget at once. The output is
out_proj(rmsnorm(y * silu(z))).

Fast form (the state space duality): the sequence is cut into chunks of ``chunk`` positions; inside a
chunk the outputs are one masked matrix product, (C B^T . L) (dt x), with L[i, j] the decay from j to i
(zero above the diagonal); each chunk also sums what it writes into a (P, N) state, and a short recurrence
over chunks carries those states forward, read by the next chunk through C. Time grows as T x chunk and
memory as T. The slow form (``slow = True``) is the recurrence above, one position at a time: the tests
prove the two equal.

The core runs in float32 (float64 stays float64) and outside autocast: the decays are exponentials of
sums over many steps, and bfloat16's 8 bits of mantissa round a slow head's decay per step, exp(-0.001),
to 1. What a layer carries from token to token is the E x N state and the convolution's last
``conv_kernel - 1`` inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distseq.errors import ConfigError
from distseq.models.base import register_model
from distseq.models.conv import CausalConv
from distseq.models.stack import stack_for
from distseq.options import MAX_WIDTH, option
from distseq.tasks import Task, TaskSpec

A_RANGE = (1.0, 16.0)  # initial decay rates -A per head, uniform
DT_RANGE = (1e-3, 1e-1)  # initial step sizes softplus(dt_bias), log-uniform
NORM_EPS = 1e-5
CHUNK = 32  # fastest of 32, 64, 128, 256 on one CPU thread at width 64, seq 2,048 (forward + backward)


@dataclass
class MambaOptions:
    state_size: int = option(16, "the state's size per channel, N (each head's state is --head-dim x N)", low=1,
                             high=MAX_WIDTH)
    expand: int = option(2, "inner channels per unit of --hidden-size", low=1, high=MAX_WIDTH)
    head_dim: int = option(16, "channels per head, each head with its own decay (must divide --expand x "
                               "--hidden-size)", low=1, high=MAX_WIDTH)
    conv_kernel: int = option(4, "taps of the causal depthwise convolution before the state space", low=1,
                              high=MAX_WIDTH)


def decay_matrix(log_decay: torch.Tensor) -> torch.Tensor:
    """(..., L) log decays per step -> (..., L, L): entry [i, j] = exp(log_decay[j+1] + ... + log_decay[i])
    for j <= i (1 on the diagonal) and exactly 0 above it, so no later position leaks into an earlier one.
    Each entry sums its own steps rather than subtracting two running sums: no cancellation in float32."""
    length = log_decay.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril()  # (L, L): [i, j], j <= i
    steps = log_decay[..., :, None].expand(*log_decay.shape, length)  # (..., L, L): [k, j] = log_decay[k]
    sums = steps.masked_fill(~causal.tril(-1), 0.0).cumsum(dim=-2)  # (..., L, L): [i, j] = sum over j < k <= i
    return sums.masked_fill(~causal, -math.inf).exp()  # exp(-inf) = 0 exactly above the diagonal


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """The state space's outputs (without the skip D x) in chunks of ``chunk`` positions.

    x (b, T, H, P), dt (b, T, H) > 0, A (H,) < 0, B and C (b, T, N) -> (b, T, H, P)."""
    b, T, H, P = x.shape
    n = -(-T // chunk)  # chunks
    pad = n * chunk - T  # zeros at the end: they write nothing (dt = 0) and only later positions could read them
    x = F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, n, chunk, H, P).permute(0, 3, 1, 2, 4)  # (b, H, n, l, P)
    dt = F.pad(dt, (0, 0, 0, pad)).view(b, n, chunk, H).permute(0, 3, 1, 2)  # (b, H, n, l)
    B, C = (F.pad(t, (0, 0, 0, pad)).view(b, n, chunk, -1) for t in (B, C))  # (b, n, l, N)
    log_decay = dt * A[:, None, None]  # (b, H, n, l): log of each step's decay
    written = x * dt[..., None]  # (b, H, n, l, P): what each position writes, before B

    within = (C @ B.transpose(-1, -2))[:, None] * decay_matrix(log_decay)  # (b, H, n, l, l)
    y = within @ written  # (b, H, n, l, P): from the same chunk

    decayed = log_decay.cumsum(dim=-1)  # (b, H, n, l): log decay from the chunk's start to each position
    to_end = (decayed[..., -1:] - decayed).exp()  # (b, H, n, l): from each position to the chunk's end
    chunk_states = (written * to_end[..., None]).transpose(-1, -2) @ B[:, None]  # (b, H, n, P, N)
    entering = states_entering(chunk_states, decayed[..., -1].exp())  # (b, H, n, P, N)
    y = y + (C[:, None] @ entering.transpose(-1, -2)) * decayed.exp()[..., None]  # (b, H, n, l, P)
    return y.permute(0, 2, 3, 1, 4).reshape(b, n * chunk, H, P)[:, :T]


def states_entering(chunk_states: torch.Tensor, chunk_decay: torch.Tensor) -> torch.Tensor:
    """The state at each chunk's start: zero for the first, then (state before) x decay + what the chunk
    before wrote. chunk_states (b, H, n, P, N), chunk_decay (b, H, n) -> (b, H, n, P, N). A loop over the
    chunks, T / chunk steps: memory stays linear in T."""
    state = torch.zeros_like(chunk_states[:, :, 0])  # (b, H, P, N)
    entering = [state]
    for k in range(chunk_states.shape[2] - 1):
        state = state * chunk_decay[:, :, k, None, None] + chunk_states[:, :, k]  # (b, H, P, N)
        entering.append(state)
    return torch.stack(entering, dim=2)


def ssd_steps(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The reference: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, one position at a time.
    Shapes as ``ssd_chunked``."""
    b, T, H, P = x.shape
    state = x.new_zeros(b, H, P, B.shape[-1])  # (b, H, P, N)
    outputs = []
    for t in range(T):
        decay = (dt[:, t] * A).exp()[..., None, None]  # (b, H, 1, 1)
        write = (x[:, t] * dt[:, t, :, None])[..., None] * B[:, t, None, None, :]  # (b, H, P, N)
        state = decay * state + write
        outputs.append((state @ C[:, t, None, :, None]).squeeze(-1))  # (b, H, P)
    return torch.stack(outputs, dim=1)  # (b, T, H, P)


def in_float32(core: Callable[..., torch.Tensor], x: torch.Tensor, *others: torch.Tensor, **options) -> torch.Tensor:
    """``core(x, *others)`` computed in float32 or wider, autocast off, returned in x's dtype."""
    precise = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        y = core(*(t.to(precise) for t in (x, *others)), **options)
    return y.to(x.dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, width: int, state_dim: int = 16, expand: int = 2, head_dim: int = 16, conv_kernel: int = 4):
        super().__init__()
        inner = expand * width
        self.inner, self.state_dim, self.heads, self.head_dim = inner, state_dim, inner // head_dim, head_dim
        self.in_proj = nn.Linear(width, 2 * inner + 2 * state_dim + self.heads, bias=False)  # z, x, B, C, dt
        conv_channels = inner + 2 * state_dim  # x, B, C
        self.conv = CausalConv(conv_channels, conv_kernel)
        self.A_log = nn.Parameter(torch.zeros(self.heads))  # (H,)
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))  # (H,)
        self.D = nn.Parameter(torch.ones(self.heads))  # (H,)
        self.norm_weight = nn.Parameter(torch.ones(inner))  # (E,)
        self.out_proj = nn.Linear(inner, width, bias=False)
        self.chunk = CHUNK  # the fast form's chunk length: speed only, the outputs are the same
        self.slow = False
        self.initialize()  # ready on its own; the stack calls it again after its generic initialisation

    @torch.no_grad()
    def initialize(self) -> None:
        """Decay rates -A uniform in [1, 16], step sizes log-uniform in [1e-3, 1e-1]: heads that forget within
        a few tokens (exp(-0.1 x 16) = 0.2 a step) and heads that keep for a thousand (exp(-0.001 x 1) a step)."""
        rates = torch.empty(self.heads).uniform_(*A_RANGE)  # (H,)
        low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
        dt = torch.empty(self.heads).uniform_(low, high).exp()  # (H,)
        self.A_log.copy_(rates.log())
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def mixing_flops(self, seq_len: int) -> float:
        """The recurrence per token, per channel and state entry: decay 1, write 2 (multiply, add), read 2
        (multiply, add): 5 x E x N, plus E for the skip D x. The chunked form does more arithmetic for the
        same result (its T x chunk products); this counts the model, as attention's count does. The gate
        and the norm's few per-channel operations are left out, as norms are elsewhere."""
        return 5.0 * self.inner * self.state_dim + self.inner

    def state_size(self, seq_len: int) -> int:
        """The E x N state and the convolution's last kernel - 1 inputs (x, B, C): fixed, whatever seq_len."""
        return self.inner * self.state_dim + self.conv.state_size()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, T, _ = h.shape
        E, N, H = self.inner, self.state_dim, self.heads
        z, xBC, dt = self.in_proj(h).split([E, E + 2 * N, H], dim=-1)  # (b, T, E), (b, T, E + 2N), (b, T, H)
        xBC = F.silu(self.conv(xBC))  # (b, T, E + 2N)
        x, B, C = xBC.split([E, N, N], dim=-1)
        x = x.reshape(batch, T, H, self.head_dim)  # (b, T, H, P)
        dt = F.softplus(dt + self.dt_bias)  # (b, T, H)
        A = -self.A_log.exp()  # (H,)
        if self.slow:
            y = in_float32(ssd_steps, x, dt, A, B, C)
        else:
            y = in_float32(ssd_chunked, x, dt, A, B, C, chunk=self.chunk)  # (b, T, H, P)
        y = (y + x * self.D[:, None]).reshape(batch, T, E)
        return self.out_proj(self.gated_norm(y, z))

    def gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """rmsnorm(y * silu(z)) x weight, computed in float32 or wider (a mean of squares over E channels)."""
        gated = y * F.silu(z)  # (b, T, E)
        precise = gated.to(torch.promote_types(gated.dtype, torch.float32))
        normed = precise * torch.rsqrt(precise.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)
        return (normed * self.norm_weight).to(gated.dtype)


@register_model("mamba", options=MambaOptions)
def mamba(cfg, task: Task, spec: TaskSpec) -> nn.Module:
    # no positions: the convolution and the recurrence see the order
    return stack_for(cfg, task, spec, lambda: Mamba2Mixer(cfg.hidden_size, cfg.state_size, cfg.expand, cfg.head_dim,
                                                          cfg.conv_kernel))


def _validate(cfg) -> None:
    m = cfg.model
    inner = m.expand * m.hidden_size
    if inner % m.head_dim:
        divisors = [d for d in range(1, inner + 1) if inner % d == 0]
        raise ConfigError("--head-dim", f"{m.head_dim} does not divide --expand x --hidden-size = {inner} "
                                        f"(choose from {', '.join(map(str, divisors))})")


mamba.validate = _validate
