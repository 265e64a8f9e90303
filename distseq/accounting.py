"""Data accounting: a cheap digest of consumed sample indices that proves none was lost or repeated.

Each rank folds the stream positions it trained on into (count, sum, xor of a 64-bit hash). Sums
and xors commute, so the digests of all ranks combine into the digest of their union, which must
equal the digest of the expected range ``[start, stop)``: a lost, repeated or foreign index changes
the count, the sum or (with overwhelming probability) the hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (torch integer arithmetic wraps modulo 2**64)."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_C1, _C2, _C3 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def index_hash(index: torch.Tensor) -> torch.Tensor:
    """splitmix64 of each int64 index, vectorised."""
    x = index.to(torch.int64) + _C1
    x = (x ^ _shift_right(x, 30)) * _C2
    x = (x ^ _shift_right(x, 27)) * _C3
    return x ^ _shift_right(x, 31)


def _xor_reduce(x: torch.Tensor) -> torch.Tensor:
    while x.numel() > 1:
        if x.numel() % 2:
            x = torch.cat([x, x.new_zeros(1)])
        x = x[0::2] ^ x[1::2]
    return x.reshape(()) if x.numel() else torch.zeros((), dtype=torch.int64)


@dataclass
class Digest:
    count: int = 0
    total: int = 0  # sum of indices modulo 2**64, as int64
    xor: int = 0  # xor of index_hash over the indices

    def add(self, index: torch.Tensor) -> None:
        index = index.to(torch.int64).cpu()
        self.count += index.numel()
        self.total = _signed(self.total + int(index.sum()))
        self.xor = _signed(self.xor ^ int(_xor_reduce(index_hash(index))))

    def merge(self, other: "Digest") -> "Digest":
        return Digest(self.count + other.count, _signed(self.total + other.total), _signed(self.xor ^ other.xor))

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.count, self.total, self.xor], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Digest":
        count, total, xor = (int(v) for v in t.tolist())
        return cls(count, total, xor)

    @classmethod
    def of_range(cls, start: int, stop: int, chunk: int = 1 << 20) -> "Digest":
        digest = cls()
        for lo in range(start, stop, chunk):
            digest.add(torch.arange(lo, min(stop, lo + chunk), dtype=torch.int64))
        return digest
