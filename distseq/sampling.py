"""Sampling without replacement, vectorised over rows and exact.

``choose_distinct`` draws, for each of ``n`` rows, ``m`` distinct indices into a table of weights in
the order successive sampling picks them: each next index with probability proportional to its
weight among those not picked yet (numpy's ``choice(replace=False, p=...)``; uniform weights give a
uniformly random ordered subset). Two exact ways, chosen by cost:

- few choices (``len(weights) <= RACE_FACTOR * m``): the exponential race. Index i gets the key
  ``E_i / w_i`` with ``E_i ~ Exp(1)``; the order of the m smallest keys is the successive-sampling
  order (Efraimidis & Spirakis 2006). Costs one random number per choice.
- many choices: the first m distinct values of i.i.d. draws (an i.i.d. draw that repeats an earlier
  one is exactly the rejection step of successive sampling). Costs about m draws; a row that has
  fewer than m distinct values yet draws more, so no row is ever cut short.

Both consume the generator in a fixed order, so the result is a pure function of its state.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

RACE_FACTOR = 4  # above this many choices per pick, i.i.d. draws rarely repeat: draw and deduplicate


def choose_distinct(gen: torch.Generator, n: int, m: int, num_choices: int,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, m) int64 indices in [0, num_choices), distinct within each row, in successive-sampling order.
    ``weights``: (num_choices,) positive float64, or None for uniform."""
    if m > num_choices:
        raise ValueError(f"cannot choose {m} distinct of {num_choices}")
    if num_choices <= RACE_FACTOR * m:
        keys = -torch.rand(n, num_choices, generator=gen, dtype=torch.float64).log_()  # (n, N) ~ Exp(1)
        if weights is not None:
            keys /= weights
        return keys.topk(m, dim=1, largest=False, sorted=True).indices
    if weights is None:
        def draw(rows: int, count: int) -> torch.Tensor:
            return torch.randint(0, num_choices, (rows, count), generator=gen)
    else:
        prob, alias = alias_table(tuple(weights.tolist()))

        def draw(rows: int, count: int) -> torch.Tensor:
            bins = torch.randint(0, num_choices, (rows, count), generator=gen)  # (rows, count)
            accept = torch.rand(rows, count, generator=gen, dtype=torch.float64) < prob[bins]
            return torch.where(accept, bins, alias[bins])
    return _first_distinct(draw, n, m, num_choices)


def _first_distinct(draw, n: int, m: int, num_choices: int) -> torch.Tensor:
    """The first m distinct values of each row of i.i.d. draws; more draws for rows short of m."""
    extra = max(8, (2 * m * m) // num_choices)  # a few more than the expected repeats
    out = torch.empty(n, m, dtype=torch.int64)
    rows = torch.arange(n)
    candidates = draw(n, m + extra)  # (r, c)
    while True:
        first = _first_occurrences(candidates, num_choices)  # (r, c) bool
        rank = first.cumsum(1)
        enough = rank[:, -1] >= m  # (r,)
        keep = first & (rank <= m)
        out[rows[enough]] = candidates[enough][keep[enough]].view(-1, m)
        if bool(enough.all()):
            return out
        short = ~enough
        rows = rows[short]
        candidates = torch.cat([candidates[short], draw(len(rows), m + extra)], dim=1)


def _first_occurrences(values: torch.Tensor, num_choices: int) -> torch.Tensor:
    """(r, c) bool: True where a value appears for the first time in its row. Each value's earliest
    column is found with one scatter-min into an (r, num_choices) table: deterministic, no sort."""
    r, c = values.shape
    column = torch.arange(c, dtype=torch.int32).expand(r, c)
    earliest = torch.full((r, num_choices), c, dtype=torch.int32)
    earliest.scatter_reduce_(1, values, column, reduce="amin")
    return earliest.gather(1, values) == column


@functools.lru_cache(maxsize=16)
def alias_table(weights: Tuple[float, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Walker's alias table (Vose's construction) for drawing index i with probability w_i / sum(w)
    in O(1): bin b is kept with probability ``prob[b]``, else replaced by ``alias[b]``."""
    count = len(weights)
    total = sum(weights)
    scaled = [w * count / total for w in weights]
    prob, alias = [1.0] * count, list(range(count))
    small = [i for i, s in enumerate(scaled) if s < 1.0]
    large = [i for i, s in enumerate(scaled) if s >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        prob[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    return torch.tensor(prob, dtype=torch.float64), torch.tensor(alias, dtype=torch.int64)
