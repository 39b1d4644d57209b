"""Counter-based random numbers keyed by (seed, stream, sample id).

Random starts and random targets must not depend on how samples are batched: attacking sample
#17 alone, inside a batch of 500, on another rank of a DDP job or on another device must draw the
same noise. So noise is a pure function of (seed, stream, sample id, element index), computed
with a 32-bit integer hash in int64 tensor arithmetic on the samples' device (no host sync, no
generator state). Multipliers stay below 2**31 so every product fits in a signed int64.

Training's randomness per epoch is seeded here too, so a resumed training replays every epoch:
the loop's (batch order, augmentation, dropout) from ``epoch_seed(seed, epoch)``, the inner
attack's random starts from ``attack_seed(seed, epoch)``, a stream of its own.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    # a murmur3-style finaliser with 31-bit multipliers (products stay < 2**63)
    h = h & _M32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
    h = ((h ^ (h >> 16)) * 0x2C1B3C6D) & _M32
    h = ((h ^ (h >> 15)) * 0x297A2D39) & _M32
    return h ^ (h >> 16)


def _bits(seed: int, stream: int, ids: torch.Tensor, numel: int) -> torch.Tensor:
    """(n, numel) int64 tensor of 32-bit hashes."""
    ids = ids.to(torch.int64).reshape(-1, 1)
    key = _mix(torch.tensor([(seed * 0x3C6EF372 + stream * 0x1B873593) & _M32], device=ids.device))
    row = _mix(ids * 0x68E31DA4 + key)
    j = torch.arange(numel, device=ids.device, dtype=torch.int64).reshape(1, -1)
    return _mix(row * 0x5BD1E995 + j)


def uniform(seed: int, stream: int, ids: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """U[0,1) of shape (len(ids), *shape), one row per sample id."""
    numel = math.prod(shape)
    b = _bits(seed, stream, ids, numel)
    u = (b >> 8).to(torch.float64) * (2.0 ** -24)  # 24 bits: exact in float32, never 1.0
    return u.to(dtype).reshape(len(ids), *shape)


def normal(seed: int, stream: int, ids: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Standard normal (Box-Muller) of shape (len(ids), *shape)."""
    numel = math.prod(shape)
    u = uniform(seed, stream, ids, (2, numel), dtype=torch.float64)
    u1 = 1.0 - u[:, 0]  # in (0, 1]
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u[:, 1])
    return z.to(dtype).reshape(len(ids), *shape)


def randint(seed: int, stream: int, ids: torch.Tensor, high: int) -> torch.Tensor:
    """One integer in [0, high) per sample id."""
    return (_bits(seed, stream, ids, 1).reshape(-1) % high).to(torch.int64)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of training epoch ``epoch`` of a run seeded with ``seed`` (batch order, augmentation,
    dropout): a fixed mix of the two, the same on every rank and after --resume."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 63 - 1)


def attack_seed(seed: int, epoch: int) -> int:
    """The seed of the inner attack's random starts in training epoch ``epoch`` (< 2**31): a stream
    apart from epoch_seed's, so that the starts do not follow the batch order's generator."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 17) % (2 ** 31 - 1)
