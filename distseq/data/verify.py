"""Data accounting: a cheap digest of consumed sample indices that proves none was lost or repeated.

Each rank folds the stream positions it trained on into (count, sum, xor of a 64-bit hash). Sums
and xors commute, so the digests of all ranks combine into the digest of their union, which must
equal the digest of the expected range ``[start, stop)``: a lost, repeated or foreign index changes
the count, the sum or (with overwhelming probability) the hash. Arithmetic is numpy uint64, which
wraps modulo 2**64 and shifts logically, in a handful of C calls per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
from accelerate import Accelerator

from distseq.distributed.agree import main_decides
from distseq.errors import DataAccountingError

MASK64 = (1 << 64) - 1


def index_hash(index: np.ndarray) -> np.ndarray:
    """splitmix64 of each index (uint64 in, uint64 out), vectorised."""
    with np.errstate(over="ignore"):
        x = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _to_int64(value: int) -> int:
    """A 64-bit pattern as the signed value an int64 tensor can carry."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class Digest:
    count: int = 0
    total: int = 0  # sum of indices modulo 2**64
    xor: int = 0  # xor of index_hash over the indices

    def add(self, index: torch.Tensor) -> None:
        values = index.cpu().numpy().astype(np.uint64, copy=False)
        self.count += values.size
        self.total = (self.total + int(values.sum(dtype=np.uint64))) & MASK64
        self.xor ^= int(np.bitwise_xor.reduce(index_hash(values))) if values.size else 0

    def merge(self, other: "Digest") -> "Digest":
        return Digest(self.count + other.count, (self.total + other.total) & MASK64, self.xor ^ other.xor)

    def as_tensor(self) -> torch.Tensor:
        """int64 (3,) for collectives."""
        return torch.tensor([self.count, _to_int64(self.total), _to_int64(self.xor)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Digest":
        count, total, xor = (int(v) & MASK64 for v in t.tolist())
        return cls(count, total, xor)

    @classmethod
    def of_range(cls, start: int, stop: int, chunk: int = 1 << 22) -> "Digest":
        digest = cls()
        for lo in range(start, stop, chunk):
            digest.add(torch.arange(lo, min(stop, lo + chunk), dtype=torch.int64))
        return digest


def verify_digest(accelerator: Accelerator, window: Digest, start: int, stop: int) -> List[Digest]:
    """All ranks' digests of the window; the main process checks their union is ``[start, stop)``."""
    per_rank = accelerator.gather(window.as_tensor().to(accelerator.device)).reshape(-1, 3).cpu()
    digests = [Digest.from_tensor(row) for row in per_rank]

    def check() -> None:
        union = Digest()
        for digest in digests:
            union = union.merge(digest)
        expected = Digest.of_range(start, stop)
        if union != expected:
            raise DataAccountingError(f"data accounting failed for samples [{start}, {stop}): got {union}, "
                                      f"expected {expected}")

    main_decides(accelerator, check)
    return digests


@dataclass
class Accounting:
    """--verify-data: the digest of the current window and of everything checked so far, per rank."""

    checked_until: int  # stream position up to which every sample has been verified
    world_size: int
    window: Digest = field(default_factory=Digest)
    per_rank: List[Digest] = field(default_factory=list)

    def check(self, accelerator: Accelerator, until: int) -> None:
        digests = verify_digest(accelerator, self.window, self.checked_until, until)
        self.per_rank = [a.merge(b) for a, b in zip(self.per_rank or [Digest()] * self.world_size, digests)]
        self.checked_until, self.window = until, Digest()

    def report(self) -> dict:
        return {"checked_until": self.checked_until, "per_rank": [vars(d) for d in self.per_rank]}
