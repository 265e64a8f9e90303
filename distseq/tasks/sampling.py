"""Sampling without replacement, vectorised over rows and exact.

``choose_distinct`` draws, for each of ``n`` rows, ``m`` distinct indices into a table of weights in
the order successive sampling picks them: each next index with probability proportional to its
weight among those not picked yet (numpy's ``choice(replace=False, p=...)``; uniform weights give a
uniformly random ordered subset). Two exact ways, chosen by cost:

- few choices (``len(weights) <= RACE_FACTOR * m``): the exponential race. Index i gets the key
  ``E_i / w_i`` with ``E_i ~ Exp(1)``; the order of the m smallest keys is the successive-sampling
  order (Efraimidis & Spirakis 2006). Costs one random number per choice.
- many choices: the first m distinct values of i.i.d. draws (an i.i.d. draw that repeats an earlier
  one is exactly the rejection step of successive sampling; weighted draws use Walker's alias
  table). Draws a little more than m distinct values need on average (``draws_needed``); a row that
  has fewer than m distinct values yet draws more, continuing its own sequence, so no row is ever
  cut short. Repeats are found with a scatter-min into a per-row table (``first_occurrences``): one
  slot per choice while that is small, else a hash table checked exactly, so the cost never grows
  with the number of choices. No per-row sort (slow on a CPU for short rows).

Both consume the generator in a fixed order, so the result is a pure function of its state.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

RACE_FACTOR = 4  # above this many choices per pick, i.i.d. draws rarely repeat: draw and deduplicate
# repeats are found with a table of one slot per choice while it is at most this many slots per draw and
# this many bytes (measured: cheaper than the hash table's exact pass up to there), else with the hash table
DIRECT_PER_CANDIDATE, DIRECT_BYTES = 100, 16 << 20


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
        table = None

        def draw(rows: int, count: int) -> torch.Tensor:
            return torch.randint(0, num_choices, (rows, count), generator=gen)
    else:
        table = tuple(weights.tolist())
        prob, alias = alias_table(table)
        pick = torch.stack([alias, torch.arange(num_choices)], 1).view(-1)  # [2b]: b's alias, [2b + 1]: b

        def draw(rows: int, count: int) -> torch.Tensor:
            bins = torch.randint(0, num_choices, (rows * count,), generator=gen)
            accept = torch.rand(rows * count, generator=gen, dtype=torch.float64) < prob.index_select(0, bins)
            return pick.index_select(0, bins.mul_(2).add_(accept.long())).view(rows, count)  # b if accepted
    first, more = draws_needed(m, num_choices, table)
    return _first_distinct(draw, draw(n, first), m, more, num_choices)


@functools.lru_cache(maxsize=64)
def draws_needed(m: int, num_choices: int, weights: Optional[Tuple[float, ...]]) -> Tuple[int, int]:
    """How many i.i.d. draws per row to make at first, and then per extra round for rows still short.

    About the mean number of draws that m distinct values need, t with sum_i 1 - (1 - p_i)^t = m (the
    distinct values t draws reach on average), plus a margin of 3 sqrt(t - m + 1), so few rows need a
    second round. Only the cost depends on these, never the distribution of the result."""
    p = torch.full((num_choices,), 1.0 / num_choices, dtype=torch.float64) if weights is None else \
        torch.tensor(weights, dtype=torch.float64) / sum(weights)
    lo, hi = float(m), 2.0 * m
    while float((1 - (1 - p) ** hi).sum()) < m:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((1 - (1 - p) ** mid).sum()) < m else (lo, mid)
    spread = 3 * math.sqrt(hi - m + 1)
    return min(int(hi + spread) + 2, 4 * m + 8), int(spread) + 8


def _first_distinct(draw, candidates: torch.Tensor, m: int, more: int, num_choices: int) -> torch.Tensor:
    """The first m distinct values of each row of i.i.d. draws ``candidates`` (r, c); a row short of m
    draws ``more`` at a time, continuing its own sequence, until it has m."""
    r = len(candidates)
    first = first_occurrences(candidates, num_choices)  # (r, c) bool
    rank = first.cumsum(1, dtype=torch.int32)
    short = (rank[:, -1] < m).nonzero().squeeze(1)  # (s,) rows with fewer than m distinct values
    keep = first.logical_and_(rank <= m)
    if len(short) == 0:
        return candidates.masked_select(keep).view(r, m)
    longer = torch.cat([candidates.index_select(0, short), draw(len(short), more)], dim=1)
    done = torch.ones(r, 1, dtype=torch.bool).index_fill_(0, short, False)
    out = torch.empty(r, m, dtype=torch.int64)
    out[done[:, 0]] = candidates.masked_select(keep.logical_and_(done)).view(-1, m)
    out[short] = _first_distinct(draw, longer, m, more, num_choices)
    return out


def small_int(count: int) -> torch.dtype:
    """The narrowest integer dtype that holds 0..count."""
    return torch.int8 if count < 2**7 else torch.int16 if count < 2**15 else torch.int32


def first_occurrences(values: torch.Tensor, num_choices: int) -> torch.Tensor:
    """(r, c) bool: True where a value (in [0, num_choices)) appears for the first time in its row.

    Each value's earliest column comes from a scatter-min of columns into a per-row table
    (deterministic, no sort): one slot per choice when that table is small (exact at once), else the
    buckets of a hash table a power of two >= 8c wide, so the cost never grows with ``num_choices``.
    A value alone in its bucket so far is first; the rest (a repeat, or a collision: a few per row)
    are settled exactly by one stable sort of just the entries of shared buckets on (row, value)."""
    r, c = values.shape
    dtype = small_int(c)
    column = torch.arange(c, dtype=dtype).expand(r, c)
    width = 1 << max(6, (8 * c - 1).bit_length())
    exact = num_choices <= DIRECT_PER_CANDIDATE * c and r * num_choices * column.element_size() <= DIRECT_BYTES
    if exact:
        width, bucket = num_choices, values
    else:
        bucket = values & (width - 1)  # (r, c)
    earliest = torch.full((r, width), c, dtype=dtype)
    earliest.scatter_reduce_(1, bucket, column, reduce="amin")
    first = earliest.gather(1, bucket) == column  # (r, c): no earlier value of the row in its bucket
    if exact:
        return first
    later = (~first).view(-1).nonzero().squeeze(1)  # flat (row-major) indices
    if len(later) == 0:
        return first
    crowded = torch.zeros(r, width, dtype=torch.bool)  # buckets holding more than one value
    crowded.view(-1).index_fill_(0, later.div(c, rounding_mode="floor") * width + bucket.view(-1)[later], True)
    where = crowded.gather(1, bucket).view(-1).nonzero().squeeze(1)  # (s,) their entries, row-major
    picked = values.view(-1)[where]
    key = where.div(c, rounding_mode="floor") * num_choices + picked  # (row, value) as one int64
    order = key.sort(stable=True).indices  # equal keys keep their row-major (column) order
    ordered = key[order]
    is_first = torch.ones_like(ordered, dtype=torch.bool)
    torch.ne(ordered[1:], ordered[:-1], out=is_first[1:])
    first.view(-1)[where[order]] = is_first
    return first


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


class Permutation:
    """A seeded permutation of ``[0, n)`` evaluated at any index in O(1), without materialising it.

    A Feistel network on a rectangle (FFX's alternating form with modular addition): index ``x`` of
    ``[0, a*b)``, ``a = ceil(sqrt(n))``, ``b = ceil(n / a)``, is the pair ``(x div b, x mod b)``, and
    each round adds a keyed mix of one part to the other modulo its size, which is invertible for
    any mix, so the network is a bijection of ``[0, a*b)``. Cycle-walking maps the few images at or
    past ``n`` (fewer than ``a``, about ``1/sqrt(n)`` of them) again until they land inside, which
    keeps a bijection of ``[0, n)``. Every row is equally likely at every position, rows that are
    neighbours in a file end up far apart, and position ``i`` costs a fixed number of integer
    operations: what a shuffled pass over 10^9 rows needs when a full ``randperm`` would take 8 GB.
    """

    ROUNDS = 6

    def __init__(self, n: int, keys: Tuple[int, ...]):
        """``keys``: ROUNDS independent, well-mixed integers (``data.derive_seed``), one per round."""
        if n < 1 or len(keys) != self.ROUNDS:
            raise ValueError(f"a permutation of {n} items with {len(keys)} round keys")
        self.n = n
        self.rows = math.isqrt(n - 1) + 1  # a: the left part's size (a >= sqrt(n), below 2^31 for n < 2^62)
        self.cols = -(-n // self.rows)  # b: the right part's size; a * b >= n
        self.keys = [k & 0x7FFFFFFF for k in keys]

    @staticmethod
    def _mix(part: torch.Tensor, key: int) -> torch.Tensor:
        """A keyed 31-bit integer mix (every product stays under 2^63: no int64 overflow)."""
        v = (part ^ key) * 0x7FEB352D
        v = (v ^ (v >> 15)) & 0x7FFFFFFF
        v = v * 0x2C1B3C6D
        v = (v ^ (v >> 12)) & 0x7FFFFFFF
        return v ^ (v >> 14)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x // self.cols, x % self.cols
        for r, key in enumerate(self.keys):
            if r % 2:
                right = (right + self._mix(left, key)) % self.cols
            else:
                left = (left + self._mix(right, key)) % self.rows
        return left * self.cols + right

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The images of ``positions`` (int64 in [0, n), one dimension)."""
        out = self._network(positions)
        walking = torch.nonzero(out >= self.n).squeeze(1)  # (k,) where the image fell outside
        while walking.numel():
            again = self._network(out[walking])
            out[walking] = again
            walking = walking[again >= self.n]
        return out
