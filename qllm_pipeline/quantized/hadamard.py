"""Hadamard matrices, and the online Hadamard rotation of a projection's input (QuaRot's R4).

Construction (:func:`hadamard_matrix`, :func:`random_hadamard`)
---------------------------------------------------------------
A true Hadamard matrix (entries ±1/√n) is built, if possible, as ``H_2 ⊗ … ⊗ H_2 ⊗ P`` where P is a Paley
Hadamard matrix: Paley I for order q + 1 (q prime, q ≡ 3 mod 4) or Paley II for order 2(q + 1) (q prime,
q ≡ 1 mod 4), as QuaRot does with its stored small matrices. The smallest such Paley factor is used, so powers of two
get Sylvester's matrix; e.g. 576 = 16·36 (Paley II, q = 17), 1536 = 128·12 (Paley I, q = 11), 768 = 64·12.
If no such construction exists for n (e.g. n = 100 or an odd n), :func:`random_hadamard` uses the largest divisor d
of n that has one and Q = H_d ⊗ R_{n/d} with R a seeded Haar-random orthogonal matrix (QR of a Gaussian, signs
fixed); for d = 1 that is a plain random orthogonal matrix, and the rotation is no longer a Hadamard one (outliers
are still spread, but not perfectly evenly). :class:`OnlineHadamard` has no such fallback: it refuses such an n.

Online application (:class:`OnlineHadamard`)
--------------------------------------------
``x ↦ x H/√n`` with ``H = S ⊗ P`` (S Sylvester of order s, P Paley of order m) costs ``n·(s + m)`` multiply-adds
instead of ``n²``: for a row vector, ``x (S ⊗ P) = vec(Sᵀ X P)`` with X the ``s × m`` reshaping of x. For
SmolLM2's down_proj input (n = 1536 = 128·12) that is 140 instead of 1536 per channel: ~25 % of down_proj's own
multiply-adds (576 per input channel).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qllm_pipeline.quantized.transform_kinds import register_transform

__all__ = ["hadamard_matrix", "random_orthogonal", "random_hadamard", "hadamard_factors", "OnlineHadamard"]



def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j - i) for the quadratic character χ of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _paley(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order n from a Paley construction with a prime q, or None."""
    q = n - 1
    if n >= 4 and q % 4 == 3 and _is_prime(q):  # Paley I
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    if n % 2 == 0:
        q = n // 2 - 1
        if q >= 5 and q % 4 == 1 and _is_prime(q):  # Paley II
            m = q + 1
            c = torch.zeros(m, m, dtype=torch.float64)
            c[0, 1:] = 1.0
            c[1:, 0] = 1.0
            c[1:, 1:] = _jacobsthal(q)
            one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, one) + torch.kron(torch.eye(m, dtype=torch.float64), zero)
    return None


def _paley_order(n: int) -> bool:
    """Whether :func:`_paley` builds an order-n matrix (arithmetic only, nothing is built)."""
    if n >= 4 and (n - 1) % 4 == 3 and _is_prime(n - 1):
        return True
    return n % 2 == 0 and n // 2 - 1 >= 5 and (n // 2 - 1) % 4 == 1 and _is_prime(n // 2 - 1)


def _hadamard_plan(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k · m and m = 1 or a Paley order, preferring the smallest m (Sylvester for powers of two);
    None if there is none."""
    power = n & -n  # the largest power of two dividing n
    m = n // power
    while power >= 1:
        if m == 1 or _paley_order(m):
            return power, m
        m, power = m * 2, power // 2
    return None


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _hadamard(n: int) -> Tensor | None:
    plan = _hadamard_plan(n)
    if plan is None:
        return None
    power, m = plan
    sylvester = _sylvester(power)
    return sylvester if m == 1 else torch.kron(sylvester, _paley(m))


def hadamard_matrix(n: int) -> Tensor | None:
    """An unnormalized ±1 Hadamard matrix (H Hᵀ = n I, float64) of order n, or None if none is constructed.

    Orders covered: 2^k · m with m = 1 (Sylvester), m = q + 1 (Paley I, q prime ≡ 3 mod 4) or m = 2(q + 1)
    (Paley II, q prime ≡ 1 mod 4); the smallest such m is used. Not covered (None): e.g. 52, 100, every odd n > 1.
    """
    if n < 1:
        raise ValueError(f"n={n} must be positive")
    return _hadamard(int(n))


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random n×n orthogonal matrix (float64): QR of a Gaussian with R's diagonal made positive."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs.unsqueeze(0)).contiguous()


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A seeded orthogonal n×n matrix D·M: M a normalized Hadamard matrix where one can be built, D a random ±1 diagonal.

    If no Hadamard matrix of order n is constructed (see :func:`hadamard_matrix`), M = H_d/√d ⊗ R with d the largest
    divisor of n that has one and R a seeded random orthogonal matrix of order n/d (d = 1: M = R). Deterministic in
    (n, seed).
    """
    if n < 1:
        raise ValueError(f"n={n} must be positive")
    generator = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    h = _hadamard(n)
    if h is not None:
        m = h / math.sqrt(n)
    else:
        d = max(k for k in range(1, n // 2 + 1) if n % k == 0 and _hadamard_plan(k) is not None)
        m = torch.kron(_hadamard(d) / math.sqrt(d), random_orthogonal(n // d, generator))
    return (signs.unsqueeze(1) * m).to(dtype)


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(s, m) with n = s·m, s a power of two (Sylvester) and m = 1 or a Paley order; None if n has no such form."""
    return _hadamard_plan(int(n))


@functools.lru_cache(maxsize=64)
def _factor_matrices(n: int, device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    power, m = _hadamard_plan(n)
    scale = 1.0 / math.sqrt(n)  # folded into the Sylvester factor: H/√n = (S/√n) ⊗ P
    sylvester = (_sylvester(power) * scale).to(device=device, dtype=dtype)
    paley = None if m == 1 else _paley(m).to(device=device, dtype=dtype)
    return sylvester, paley


def _hadamard_last_axis(x: Tensor) -> Tensor:
    """``x H/√n`` on the last axis (n = its size), through the factors ``S ⊗ P``."""
    sylvester, paley = _factor_matrices(x.shape[-1], str(x.device), x.dtype)
    if paley is None:
        return x @ sylvester
    s, m = sylvester.shape[0], paley.shape[0]
    grid = x.reshape(*x.shape[:-1], s, m) @ paley  # P on the last axis: one plain matmul
    # Sᵀ on the s axis, written as a matmul on the last axis too (a broadcast S @ grid would be a batched
    # matmul of tiny matrices, ~100x slower on CPU).
    return (grid.transpose(-1, -2) @ sylvester).transpose(-1, -2).reshape(x.shape)


@register_transform
class OnlineHadamard:
    """``x ↦ x H/√n`` applied at run time to a projection's input; its weight takes ``W ↦ W H/√n`` (exact in FP:
    ``(x H)(W H)ᵀ = x Wᵀ`` as H Hᵀ = n I). QuaRot's R4 before down_proj spreads the SwiGLU output's outliers over all
    channels before the per-token activation quantizer.

    With ``block`` b > 1 the transform is ``H_{n/b} ⊗ I_b``: the channels are n/b blocks of b (attention heads of
    head_dim), and only blocks are mixed, channel j of each block with channel j of the others. That is QuaRot's
    online rotation of the o_proj input: after R2 has rotated each head by H_b (``I ⊗ H_b``), the product is the
    full Hadamard ``H_{n/b} ⊗ H_b``. A full-width H after R2 would instead be ``(I ⊗ H_b)(H_{n/b} ⊗ H_b) =
    H_{n/b} ⊗ I`` for Sylvester orders (H_b H_b = I): R2 undoes the within-head half, and the o_proj input stays
    as unmixed within each head as without any rotation.
    """

    kind = "hadamard"

    def __init__(self, size: int, block: int = 1):
        size, block = int(size), int(block)
        if block < 1 or size % block:
            raise ValueError(f"block={block} does not divide the transform's size {size}")
        if hadamard_factors(size // block) is None:
            raise ValueError(
                f"no Hadamard matrix of order {size // block} is built here (needs 2^k times 1 or a Paley order such "
                "as 12, 20, 28, 36, 44, 60); disable the online Hadamard for this model"
            )
        self.size = self.in_channels = self.out_channels = size
        self.block = block

    def _apply(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"input has {x.shape[-1]} channels, the Hadamard transform expects {self.size}")
        if self.block == 1:
            return _hadamard_last_axis(x)
        # blocks on the last axis (a matmul on the last axis is the fast path), then back
        grid = x.reshape(*x.shape[:-1], self.size // self.block, self.block).transpose(-1, -2)
        return _hadamard_last_axis(grid).transpose(-1, -2).reshape(x.shape)

    def apply_to_activation(self, x: Tensor) -> Tensor:
        return self._apply(x)

    def apply_to_weight(self, w: Tensor) -> Tensor:
        return self._apply(w)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense n×n orthogonal matrix this transform multiplies by (for tests and folding)."""
        return self._apply(torch.eye(self.size, dtype=dtype))

    def to_tensors(self) -> dict[str, Tensor]:
        # no "block" entry for 1: what a full-width transform stored before blocks existed
        return {"size": torch.tensor([self.size]), **({"block": torch.tensor([self.block])} if self.block > 1 else {})}

    def runtime_buffers(self) -> dict[str, Tensor]:
        """What the shipped modeling code (remote_modeling.apply_hadamard) applies: the Sylvester factor's order (it
        rebuilds the factor once per order: stored, a power-of-two width's factor is the whole n×n matrix, 16 MiB per
        projection at 2048), the Paley factor, if the order has one (small), and the block size when above 1."""
        power, m = _hadamard_plan(self.size // self.block)
        return {"sylvester_order": torch.tensor([power]), **({"paley": _paley(m).to(torch.float32)} if m > 1 else {}),
                **({"block": torch.tensor([self.block])} if self.block > 1 else {})}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "OnlineHadamard":
        block = tensors.get("block")
        return cls(int(tensors["size"].reshape(-1)[0]), 1 if block is None else int(block.reshape(-1)[0]))

    def __repr__(self) -> str:
        return f"OnlineHadamard(size={self.size}" + (f", block={self.block})" if self.block > 1 else ")")
