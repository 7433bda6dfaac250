"""Per-example random streams: an example's random draws depend on (seed, its dataset index, the attack)
and nothing else.

A batch-wide ``torch.Generator`` hands out numbers in call order, so an example's random start changes with
the batch it lands in and with the attacks that drew before it. ``ExampleRandom`` replaces that for the
attack contract: every draw is a counter-based hash of (seed, attack, example id, draw number, element), so
row ``i`` of a draw is the same whether the example is attacked in a batch of 7 or 500, alone or after
another attack, and whichever subset of the batch is still active (``take``).

The rule an attack must follow for this to hold: the sequence of draws (their number and per-example
shapes) may depend on the iteration structure, never on which examples are in the batch. An example that
sits out a draw (not in ``take``'s subset) simply skips that draw number.

``ExampleRandom`` is also a ``torch.Generator`` (seeded from the seed, the attack and the batch's ids), so
attacks written against the plain contract (``torch.rand(..., generator=generator)``) keep working, with
batch-level randomness.
"""

from __future__ import annotations

import hashlib
import math

import torch

_M32 = 0xFFFFFFFF


def _mix(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (``lowbias32``) applied elementwise to int64 tensors holding values < 2**32.
    Products are taken modulo 2**64 by int64 wraparound; the mask keeps the low 32 bits exact."""
    v = v & _M32
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def _base(seed: int, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{salt}".encode()).digest()[:4], "little")


class ExampleRandom(torch.Generator):
    """Random streams for a batch of examples with ids ``ids`` (B,), for attack ``salt`` under ``seed``.

    Draws return (B, *shape) tensors on ``ids``' device: ``uniform`` in [0, 1), ``normal``, ``integers`` in
    [low, high), ``signs`` in {-1, +1}. ``take(rows)`` gives the streams of a subset of the batch, sharing the
    draw counter, for attacks that keep working only on the examples not yet fooled.
    """

    def __new__(cls, ids: torch.Tensor, seed: int = 0, salt: str = "", *, _counter: list[int] | None = None):
        return super().__new__(cls, device=ids.device)

    def __init__(self, ids: torch.Tensor, seed: int = 0, salt: str = "", *,
                 _counter: list[int] | None = None) -> None:
        self.ids = ids.detach().to(torch.int64).reshape(-1)
        self.seed_value = int(seed)
        self.salt = str(salt)
        base = _base(seed, salt)
        lo, hi = self.ids & _M32, (self.ids >> 32) & _M32
        self._keys = _mix(_mix(lo ^ base) ^ _mix(hi + 0x632BE5AB))
        self._counter = _counter if _counter is not None else [0]
        batch = int(_mix(torch.tensor(base) ^ (self._keys.sum() & _M32))) if self.ids.numel() else base
        self.manual_seed(batch)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def take(self, rows: torch.Tensor) -> "ExampleRandom":
        """The streams of rows ``rows`` (indices or a bool mask into this batch); draws advance both."""
        sub = ExampleRandom(self.ids[rows], self.seed_value, self.salt, _counter=self._counter)
        return sub

    def fork(self, tag: str) -> "ExampleRandom":
        """New streams for the same examples, named ``tag`` within these (a restart's own draws: how many
        draws an earlier restart made, which depends on the batch, cannot shift them)."""
        return ExampleRandom(self.ids, self.seed_value, f"{self.salt}/{tag}")

    def _bits(self, shape: tuple[int, ...], lanes: int = 1) -> torch.Tensor:
        """(lanes, B, *shape) independent 32-bit values for the next draw number."""
        c = self._counter[0]
        self._counter[0] += 1
        m = math.prod(shape)
        dev = self.ids.device
        kc = _mix(self._keys ^ _mix(torch.tensor((c + 1) * 0x9E3779B1, device=dev)))
        j = torch.arange(lanes * m, device=dev, dtype=torch.int64)
        jh = _mix(j * 0x85EBCA6B + 0x27D4EB2F)
        v = _mix(_mix(kc[:, None] ^ jh[None, :]) + kc[:, None])
        return v.view(len(self), lanes, *shape).movedim(1, 0)

    def uniform(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) uniform in [0, 1) (24-bit resolution)."""
        return ((self._bits(tuple(shape))[0] >> 8).to(dtype)) * 2.0 ** -24

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal (Box-Muller on two independent uniforms)."""
        b = self._bits(tuple(shape), lanes=2)
        u1 = ((b[0] >> 8).to(torch.float64) + 1.0) * 2.0 ** -24       # (0, 1]
        u2 = (b[1] >> 8).to(torch.float64) * 2.0 ** -24
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)

    def integers(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """(B, *shape) int64 uniform in [low, high); ``low`` where high <= low."""
        span = max(int(high) - int(low), 0)
        if span == 0:
            self._counter[0] += 1
            return torch.full((len(self), *shape), int(low), dtype=torch.int64, device=self.ids.device)
        return int(low) + (self._bits(tuple(shape))[0] % span)

    def signs(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) in {-1, +1}, each with probability 1/2."""
        return ((self._bits(tuple(shape))[0] >> 31) * 2 - 1).to(dtype)


def subset(generator: torch.Generator, rows: torch.Tensor) -> torch.Generator:
    """``generator.take(rows)`` for per-example streams; a plain generator is returned as it is."""
    return generator.take(rows) if isinstance(generator, ExampleRandom) else generator


def streams_for(generator: torch.Generator | None, n: int, device: torch.device, salt: str,
                ids: torch.Tensor | None = None) -> ExampleRandom:
    """The per-example streams an attack call gets: ids from ``ids`` (the examples' dataset indices), else
    from ``generator`` when it already is an ``ExampleRandom`` (a wrapped attack), else 0..n-1; the seed is
    the generator's seed (``initial_seed``), so what other draws consumed from it does not matter."""
    if isinstance(generator, ExampleRandom):
        seed = generator.seed_value
        ids = generator.ids if ids is None else ids
    else:
        seed = generator.initial_seed() if generator is not None else 0
    if ids is None:
        ids = torch.arange(n, device=device)
    ids = torch.as_tensor(ids, device=device).to(torch.int64).reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"{salt}: {ids.numel()} example ids for a batch of {n}")
    return ExampleRandom(ids, seed, salt)


def as_streams(generator: torch.Generator, n: int, device: torch.device, salt: str) -> ExampleRandom:
    """``generator`` when it already is per-example streams (the template's call), else streams for rows
    0..n-1 under its seed: for an attack's ``run`` called directly, outside the template."""
    return generator if isinstance(generator, ExampleRandom) else streams_for(generator, n, device, salt)
