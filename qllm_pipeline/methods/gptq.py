"""GPTQ weight rounding (Frantar, Ashkboos, Hoefler & Alistarh, ICLR 2023, arXiv 2210.17323).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns (input channels) of a linear's
weight one at a time and, after each, moves the rounding error onto the columns not yet rounded so that the layer
*output* on calibration inputs X changes as little as possible. With ``H = 2/N Σ x xᵀ`` (the Hessian of the
layer-wise loss ``||X Wᵀ - X Ŵᵀ||²``) the optimal update after rounding column i (Optimal Brain Surgeon) is

    W[:, j] -= (w_i - q(w_i)) / Hinv[i, i] * Hinv[i, j]        for the later columns j,

where Hinv is the inverse Hessian restricted to the columns not yet rounded. GPTQ gets all those restricted inverses
at once from the upper Cholesky factor U of H⁻¹ (U[i, j] / U[i, i] = Hinv[i, j] / Hinv[i, i] above), and applies
the updates lazily: exactly inside a block of ``block_size`` columns, and to the columns after the block with one
matrix product per block.

This follows the reference implementation IST-DASLab/gptq in spirit (dampening, dead inputs, ``act_order``, static
groups); the code here is written from the paper. It returns the integer form of ``quantizer.weight_codes`` so the
result plugs in wherever RTN codes do: ``quantizer.dequantize_weight(**gptq_weight_codes(...))`` is the weight.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qllm_pipeline.quantized.quantizer import QuantSpec, clipped_quant_params, quant_params

__all__ = ["HessianAccumulator", "InverseFactor", "fp_target_weight", "gptq_weight_codes", "inverse_factor"]


class HessianAccumulator:
    """Running H = 2/N Σ x xᵀ over the rows of inputs [..., in]. Each batch's product is computed in float32 (float64
    for float64 inputs) and added to a float64 sum; the scaled H is handed out in `dtype` (by default float32, or
    float64 when the inputs are float64). Float64 sums of float32 products are exact for any realistic spread of
    magnitudes, so H does not depend on how the batches are grouped: one process, or the ranks of a data-parallel job
    each summing its own windows (`all_reduce`), give the same bits. The sum lives on the device of the first batch
    (LLaMA-2-70B's largest, down_proj's 28672², is 6.6 GB while summing; the factorization's working set is larger).

    `hessian()` (and `cross()`) scale the sum once and return the result (the same tensor on every call).
    """

    def __init__(self, in_features: int, dtype: torch.dtype | None = None):
        self.in_features = int(in_features)
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self._cross: torch.Tensor | None = None  # Σ x x_fpᵀ, when FP inputs are given
        self._n = 0
        self._scaled = False

    def add(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add inputs x; with `x_fp` (the same tokens' inputs in the full-precision model) also Σ x x_fpᵀ, the
        cross term `fp_target_weight` needs. Either every batch has x_fp or none does."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}"
            )
        if x_fp is not None and x_fp.shape != x.shape:
            raise ValueError(f"x_fp shape {tuple(x_fp.shape)} does not match the inputs' {tuple(x.shape)}")
        if (x_fp is None) != (self._cross is None) and self._n:
            raise ValueError("HessianAccumulator.add: pass x_fp with every batch or with none")
        if self._scaled:
            raise ValueError("HessianAccumulator.add after hessian(): the sum was already scaled; use a new accumulator")
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._sum is None:
            self.dtype = self.dtype or compute
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        rows = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=compute)
        self._sum += rows.T @ rows
        if x_fp is not None:
            if self._cross is None:
                self._cross = torch.zeros_like(self._sum)
            fp_rows = x_fp.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=compute)
            self._cross += rows.T @ fp_rows
        self._n += rows.shape[0]

    @property
    def n_samples(self) -> int:
        return self._n

    def all_reduce(self, world) -> None:
        """Sum the accumulators of a data-parallel job's ranks, each of which added its own windows (every rank ends
        with the job's H; qllm_pipeline.core.distributed)."""
        if not world.active:
            return
        if self._scaled:
            raise ValueError("HessianAccumulator.all_reduce after hessian(): reduce the sums before scaling them")
        world.all_reduce_(self._sum)
        if self._cross is not None:
            world.all_reduce_(self._cross)
        self._n = int(world.all_reduce_(torch.tensor([float(self._n)], dtype=torch.float64)).item())

    def _scale(self) -> None:
        if not self._scaled:
            self._sum = self._sum.mul_(2.0 / self._n).to(self.dtype)
            if self._cross is not None:
                self._cross = self._cross.mul_(2.0 / self._n).to(self.dtype)
            self._scaled = True

    def hessian(self) -> torch.Tensor:
        if self._n == 0:
            raise ValueError("HessianAccumulator.hessian(): no samples were added; feed calibration inputs to add()")
        self._scale()
        return self._sum

    @contextmanager
    def parked(self) -> Iterator[torch.Tensor]:
        """The scaled Hessian in host memory for the duration, its accelerator copy freed (for the factorization,
        which needs the room); back on its device afterwards. On the CPU it stays where it is."""
        hessian = self.hessian()
        if hessian.device.type == "cpu":
            yield hessian
            return
        device, self._sum = hessian.device, None
        host = hessian.to("cpu")
        del hessian
        try:
            yield host
        finally:
            self._sum = host.to(device)

    def cross(self) -> torch.Tensor:
        """2/N Σ x x_fpᵀ (the same scale as `hessian()`); needs x_fp in `add`."""
        if self._cross is None:
            raise ValueError("HessianAccumulator.cross(): no FP inputs were added; pass x_fp to add()")
        self._scale()
        return self._cross


def fp_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight whose output on the inputs the layer really sees best matches the full-precision layer's output.

    The layer sees x (the quantized stream: earlier layers' errors included) where the FP model has x_fp. GPTQ
    matches W's own output on x; matching the FP output W·x_fp instead (GPTAQ, Li et al., ICML 2025, arXiv
    2504.02692: "asymmetric calibration") also undoes the error that reached the layer. Its objective splits:

        ||X Qᵀ - X_fp Wᵀ||² = ||X Qᵀ - X W*ᵀ||² + ||X W*ᵀ - X_fp Wᵀ||²,

    with W* the least-squares weight (the residual is orthogonal to X's columns), so rounding W* with plain GPTQ on
    the same H minimises it. Here W* = (W·Cᵀ + λW)(H + λI)⁻¹ with H = 2/N Σ x xᵀ, C = 2/N Σ x x_fpᵀ and
    λ = damp · mean(diag H): ridge-regularised toward W, so a direction calibration barely excites stays as it was.
    GPTAQ derives the same optimum column by column inside the GPTQ sweep; the closed form is shorter to check.
    """
    if tuple(cross.shape) != tuple(hessian.shape) or hessian.shape[0] != weight.shape[1]:
        raise ValueError(f"hessian {tuple(hessian.shape)} and cross {tuple(cross.shape)} must both be "
                         f"[{weight.shape[1]}, {weight.shape[1]}] for a weight of shape {tuple(weight.shape)}")
    H = hessian.double()
    lam = damp * H.diagonal().mean().clamp_min(1e-12)
    W = weight.double().to(H.device)
    rhs = W @ cross.double().T + lam * W
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    # W* A = rhs with A symmetric positive definite: solve A W*ᵀ = rhsᵀ by Cholesky.
    L = torch.linalg.cholesky(A)
    return torch.cholesky_solve(rhs.T, L).T.to(weight.dtype).to(weight.device)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes of `w` on a given grid: the same arithmetic as quantizer.quant_params, so results match RTN."""
    if symmetric:
        return torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


FACTOR_COLUMNS = 1024  # rows of K built, and columns of L⁻¹ solved, per step: C × 1024 float64 slabs beside L


@dataclass
class InverseFactor:
    """What GPTQ needs from a (damped, column-permuted) Hessian, computed once per input group: the column order,
    the upper Cholesky factor U of H⁻¹ (float32) and the inputs that were always 0."""

    perm: torch.Tensor
    U: torch.Tensor
    dead: torch.Tensor


def inverse_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False,
                   device: torch.device | str | None = None) -> InverseFactor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) of the permuted, damped Hessian, in float64 arithmetic and
    little memory: one float64 C × C matrix (factorized in place) beside the float32 result.

    With J the reversal, K = J H J = L Lᵀ gives H = R Rᵀ for the upper triangular R = J L J, so H⁻¹ = R⁻ᵀ R⁻¹ and
    U = R⁻¹ = J L⁻¹ J: one Cholesky and one triangular inverse, instead of a Cholesky, an inverse and a second
    Cholesky (the GPTQ reference's route, three C × C float64 matrices at once: 18 GiB for LLaMA-2-70B's down_proj).
    K is built in column-major order, so LAPACK/cuSOLVER factorize it in place; L⁻¹ is solved in column slabs
    (`_reversed_inverse`) straight into the float32 U.
    The caller's Hessian is not modified; it may sit in host memory while the factorization runs on `device` (by
    default the Hessian's), read a slab at a time.
    """
    C = hessian.shape[0]
    device = torch.device(device) if device is not None else hessian.device
    diag = hessian.diagonal().to(device=device, dtype=torch.float64, copy=True)
    # An input that was always 0 in calibration carries no information: its weight column can be anything, so it is
    # zeroed (it quantizes to 0) and given a unit diagonal so that H stays invertible.
    dead = diag == 0
    diag[dead] = 1.0
    # Dampening keeps the factorization stable when H is (nearly) singular, e.g. few calibration tokens.
    diag += damp * diag.mean()
    # act_order: round the columns with the largest Hessian diagonal (most output impact) first, while most columns
    # are still free to absorb their error. Stable sort: ties keep natural order.
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(C, device=device)
    reverse = perm.flip(0)
    K = torch.empty(C, C, dtype=torch.float64, device=device).mT  # column-major storage
    for r in range(0, C, FACTOR_COLUMNS):  # K = J H[perm][:, perm] J, a slab at a time (no full-size temporaries)
        rows = reverse[r : r + FACTOR_COLUMNS]
        slab = hessian.index_select(0, rows.to(hessian.device)).index_select(1, reverse.to(hessian.device))
        K[r : r + FACTOR_COLUMNS] = slab.to(device=device, dtype=torch.float64)
    K.diagonal().copy_(diag[reverse])
    L, info = torch.linalg.cholesky_ex(K, out=(K, torch.empty((), dtype=torch.int32, device=device)))
    if info.item() != 0:
        raise ValueError(
            f"the Hessian is not positive definite even after dampening (damp={damp}); "
            "increase damp or use more calibration samples"
        )
    U = torch.empty(C, C, dtype=torch.float32, device=device)
    _reversed_inverse(L, U)
    del L, K
    return InverseFactor(perm, U, dead)


def _reversed_inverse(L: torch.Tensor, U: torch.Tensor) -> None:
    """U ← J L⁻¹ J (in U's dtype) for the lower triangular L, a column slab of L⁻¹ at a time: slab c = [j0, j1) has
    rows ≥ j0 only, and its row block r = [r0, r1) is -L[r, r]⁻¹ (L[r, j0:r0] · X[j0:r0, c]) after the diagonal block
    L[c, c]⁻¹: matrix products over views of L (no copy of it), C³/3 multiply-adds in all."""
    C, step = L.shape[0], FACTOR_COLUMNS
    eye = torch.eye(step, dtype=L.dtype, device=L.device)
    diagonal = [torch.linalg.solve_triangular(L[s : s + step, s : s + step], eye[: min(step, C - s), : min(step, C - s)],
                                              upper=False) for s in range(0, C, step)]
    for j0 in range(0, C, step):
        j1 = min(j0 + step, C)
        X = torch.empty(C - j0, j1 - j0, dtype=L.dtype, device=L.device)  # rows j0.. of L⁻¹'s columns j0..j1
        X[: j1 - j0] = diagonal[j0 // step]
        for r0 in range(j1, C, step):
            r1 = min(r0 + step, C)
            X[r0 - j0 : r1 - j0] = -diagonal[r0 // step] @ (L[r0:r1, j0:r0] @ X[: r0 - j0])
        U[: C - j0, C - j1 : C - j0] = X.flip((0, 1)).to(U.dtype)
        U[C - j0 :, C - j1 : C - j0] = 0.0
        del X


def gptq_weight_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip: bool = False,
    factor: InverseFactor | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ-rounded codes of a [out, in] weight, in the format of ``quantizer.weight_codes(weight, spec)``.

    `hessian` is [in, in] (e.g. ``HessianAccumulator.hessian()``). Scales and zero points come from the spec's min-max
    quantizer: per row from the original weight (group_size None); per group from the current, error-updated columns
    when the sweep reaches the group (act_order False); or per group from the original weight up front ("static
    groups", act_order True, so the stored groups stay in natural column order while columns go in order of
    decreasing Hessian diagonal). `damp` adds damp · mean(diag H) to the diagonal. `clip=True` shrinks each range
    to the one with the least rounding error (quantizer.clipped_quant_params) instead of the plain min-max.
    `factor`: `inverse_factor(hessian, damp, act_order)` when the caller already has it (projections that share an
    input share it).
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_weight_codes expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(
            f"hessian shape {tuple(hessian.shape)} does not match the weight's in_features={in_features}; "
            f"expected [{in_features}, {in_features}]"
        )
    if not spec.enabled:
        raise ValueError("gptq_weight_codes needs a quantized spec (bits is None means no quantization)")
    group = spec.group_size
    if group is not None and in_features % group:
        raise ValueError(f"quant.group_size={group} does not divide in_features={in_features}")
    if damp < 0:
        raise ValueError(f"damp={damp} must be >= 0")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer")
    bits, symmetric = int(spec.bits), spec.symmetric
    device = weight.device
    params = clipped_quant_params if clip else quant_params

    W = weight.detach().to(torch.float32).clone()
    n_groups = in_features // group if group else 1
    dynamic_groups = group is not None and not act_order  # group params found during the sweep
    if dynamic_groups:
        scale = torch.zeros(out_features, n_groups, device=device)
        zero = torch.zeros(out_features, n_groups, device=device)
    else:
        # Per-row, or static groups: from the original weight, exactly as RTN (quantizer.weight_codes) does.
        _, scale, zero = params(W.reshape(out_features, n_groups, in_features // n_groups), bits, symmetric)
        scale, zero = scale.squeeze(-1), zero.squeeze(-1)

    if factor is None:
        factor = inverse_factor(hessian.detach().to(device), damp, act_order)
    perm, U = factor.perm.to(device), factor.U.to(device)
    W[:, factor.dead.to(device)] = 0.0  # an input never seen: its column quantizes to 0 (see inverse_factor)
    W = W[:, perm]

    col_group = (perm // group).tolist() if group else [0] * in_features  # each column's group, natural order
    codes = torch.zeros_like(W)
    i1 = 0
    while i1 < in_features:
        i2 = min(i1 + block_size, in_features)
        if dynamic_groups and (i2 // group) * group > i1:
            # End the block on a group boundary, so a group that starts inside the block also ends inside it: its
            # later columns then hold every update so far when its params are computed (columns after the block
            # only get this block's updates at the end). A group starting at the block start may span blocks:
            # at that point there are no pending updates, so W is current.
            i2 = (i2 // group) * group
        # Columns as contiguous rows (W1t[i] is column i1 + i): the per-column work below then reads and writes
        # contiguous memory, several times faster on a CPU than strided column access.
        W1t = W[:, i1:i2].T.contiguous()
        errt = torch.zeros_like(W1t)
        codest = torch.zeros_like(W1t)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic_groups and col % group == 0:
                current = torch.cat([W1t[i : i + group].T, W[:, i2 : col + group]], dim=1)
                _, s, z = params(current, bits, symmetric)
                scale[:, col // group], zero[:, col // group] = s[:, 0], z[:, 0]
            g = col_group[col]
            w = W1t[i]
            c = _round(w, scale[:, g], zero[:, g], bits, symmetric)
            codest[i] = c
            q = (c - zero[:, g]) * scale[:, g]  # = dequantize_weight's arithmetic
            errt[i] = (w - q) / U1[i, i]
            # Exact OBS update of the rest of this block.
            W1t[i + 1 :] -= U1[i, i + 1 :, None] * errt[i][None, :]
        codes[:, i1:i2] = codest.T
        err = errt.T
        # Lazy batch: all of this block's updates to the later columns at once.
        W[:, i2:] -= err @ U[i1:i2, i2:]
        i1 = i2

    inverse = torch.argsort(perm)
    return {"codes": codes[:, inverse].contiguous(), "scale": scale.contiguous(), "zero": zero.contiguous()}
