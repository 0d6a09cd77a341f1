"""Random projections P (m x r) for RSO, drawn deterministically from (seed, outer step, group key).

Every projection satisfies Assumption 5.3 of the paper in expectation, E[P P^T] = I_m, and the Haar and
coordinate ones also satisfy P^T P = (m/r) I_r exactly (up to float rounding):

- ``haar``: sqrt(m/r) times a Haar-distributed orthonormal m x r matrix (QR of a Gaussian, with the
  signs of R's diagonal folded into Q so that the distribution is exactly Haar). The paper's theory.
- ``gaussian``: i.i.d. N(0, 1/r) entries. Cheapest to draw; P^T P = (m/r) I holds only on average.
- ``coordinate``: sqrt(m/r) times r distinct columns of I_m. Y P is then a gather of r input features and
  X + P B a scaled row update, so it costs almost nothing (see core/layer.py).

The Gaussian draw always comes from a CPU ``torch.Generator``: every worker of a data-parallel job, on
any device type, gets bit-identical random numbers without communicating P.

    >>> from rso_ray.core.projection import sample_projection
    >>> p = sample_projection("haar", m=64, r=8, seed=0, outer_step=3, key=5)
    >>> tuple(p.matrix.shape)
    (64, 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ProjectionKind = Literal["haar", "gaussian", "coordinate"]
PROJECTIONS: tuple[str, ...] = ("haar", "gaussian", "coordinate")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A fixed integer mixer (unlike Python's hash(), which is salted per process for str).
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, outer_step: int, key: int) -> int:
    """A 63-bit seed that depends on all three integers; stable across processes and machines."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (outer_step & _MASK64))
    h = _splitmix64(h ^ (key & _MASK64))
    return h & ((1 << 63) - 1)


@dataclass
class Projection:
    """One drawn projection. ``matrix`` is P (m x r, float32) for haar/gaussian; for coordinate,
    ``index`` holds the r chosen input features (sorted) and ``matrix`` is None unless densified."""

    kind: str
    m: int
    r: int
    matrix: torch.Tensor | None
    index: torch.Tensor | None

    @property
    def scale(self) -> float:
        """sqrt(m/r): the factor that makes E[P P^T] = I for the coordinate projection."""
        return math.sqrt(self.m / self.r)

    def dense(self) -> torch.Tensor:
        """P as a dense m x r float32 matrix (tests and reference computations only)."""
        if self.matrix is not None:
            return self.matrix
        assert self.index is not None
        eye_cols = torch.zeros(self.m, self.r, device=self.index.device)
        eye_cols[self.index, torch.arange(self.r, device=self.index.device)] = self.scale
        return eye_cols

    def to(self, device: torch.device | str) -> Projection:
        return Projection(
            self.kind,
            self.m,
            self.r,
            None if self.matrix is None else self.matrix.to(device),
            None if self.index is None else self.index.to(device),
        )


def check_projection_kind(kind: str) -> None:
    if kind not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}; got {kind!r}")


def sample_projection(
    kind: str,
    m: int,
    r: int,
    *,
    seed: int,
    outer_step: int,
    key: int,
    device: torch.device | str = "cpu",
) -> Projection:
    """Draw P for one subspace group. Same arguments give the same P in any process."""
    check_projection_kind(kind)
    if not 0 < r <= m:
        raise ValueError(f"rank must satisfy 0 < rank <= {m} (the layer's input dimension); got {r}")
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, outer_step, key))
    if device.type == "meta":
        # Shape-only tracing (memory accounting): no numbers are needed.
        if kind == "coordinate":
            return Projection(kind, m, r, None, torch.empty(r, dtype=torch.long, device=device))
        return Projection(kind, m, r, torch.empty(m, r, device=device), None)
    if kind == "coordinate":
        index = torch.randperm(m, generator=gen)[:r].sort().values
        return Projection(kind, m, r, None, index.to(device))
    gauss = torch.randn(m, r, generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        # Entries N(0, 1/r): E[P P^T]_ii = r * (1/r) = 1.
        return Projection(kind, m, r, (gauss / math.sqrt(r)).to(device=device, dtype=torch.float32), None)
    # Haar: QR in float64 on the target device keeps P^T P = (m/r) I to ~1e-7 after the cast to float32.
    q, rr = torch.linalg.qr(gauss.to(device))  # q: (m, r) orthonormal columns
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    q = q * signs  # makes the distribution exactly Haar (QR alone is biased by its sign convention)
    return Projection(kind, m, r, (q * math.sqrt(m / r)).to(torch.float32), None)
