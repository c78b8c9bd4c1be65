"""QuaRot-style orthogonal rotation of the residual stream (Ashkboos et al. 2024, arXiv 2404.00456), folded into weights.

For an orthogonal Q (Q Qᵀ = I) the residual stream h can be carried as h Q instead of h without changing the model:

* the token embeddings become E Q;
* every linear that *reads* the residual stream (q/k/v, gate/up, lm_head; ``y = x Wᵀ``) gets W ← W Q, since
  (x Q)(W Q)ᵀ = x Wᵀ;
* every linear that *writes* into it (o_proj, down_proj) gets W ← Qᵀ W (and a bias b ← b Q), so its output is y Q;
* RMSNorm commutes with Q — RMSNorm(x Q) = RMSNorm(x) Q — because ‖x Q‖ = ‖x‖, but only when its weight is all
  ones. So the norm weights are first folded into the following linears' input columns
  (:func:`fuse_norms_into_linears`), which is exact as well.

With a randomized Hadamard Q, an outlier channel of the residual stream is spread evenly over all channels, which
makes per-token activation quantization (and per-channel weight quantization) much easier. The model's logits are
unchanged up to float rounding; all maths is done in float64 and cast back to each weight's dtype.

Non-power-of-two widths (:func:`random_hadamard`)
------------------------------------------------
A true Hadamard matrix (entries ±1/√n) is built, if possible, as ``H_2 ⊗ … ⊗ H_2 ⊗ P`` where P is a Paley
Hadamard matrix: Paley I for order q + 1 (q prime, q ≡ 3 mod 4) or Paley II for order 2(q + 1) (q prime,
q ≡ 1 mod 4). The smallest such Paley factor is used, so powers of two get
Sylvester's matrix; e.g. 576 = 16·36 (Paley II, q = 17), 96 = 8·12 (Paley I, q = 11), 768 = 64·12.
If no such construction exists for n (e.g. n = 100 or an odd n), the largest divisor d of n that has one is used and
Q = H_d ⊗ R_{n/d} with R a seeded Haar-random orthogonal matrix (QR of a Gaussian, signs fixed); for d = 1 that is
a plain random orthogonal matrix. In every case the result is multiplied by a seeded random ±1 diagonal (on the
left: Q = D M), so it is orthogonal, and deterministic given (n, seed).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import decoder_layers
from .qlinear import weight_changed

__all__ = [
    "READ_LINEARS",
    "WRITE_LINEARS",
    "hadamard_matrix",
    "random_orthogonal",
    "random_hadamard",
    "untie_lm_head",
    "fuse_norms_into_linears",
    "rotate_model",
]

# Linears of a LLaMA decoder layer that read / write the residual stream.
READ_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITE_LINEARS = ("self_attn.o_proj", "mlp.down_proj")
# norm -> the linears it feeds
NORM_LINEARS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Hadamard matrices


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


# ----------------------------------------------------------------------------------------------------------------------
# Folding into a model


def _set(param: Tensor, value: Tensor) -> None:
    param.data.copy_(value.to(param.device, param.dtype))


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of the weight if it shares it with embed_tokens; return whether it was tied."""
    head, embed = model.lm_head, model.model.embed_tokens
    tied = head.weight is embed.weight or (
        head.weight.device == embed.weight.device
        and head.weight.shape == embed.weight.shape
        and head.weight.data_ptr() == embed.weight.data_ptr()
    )
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so save_pretrained / tie_weights keep them apart
    return tied


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("folding a norm with a bias (LayerNorm) is not supported; LLaMA's RMSNorm has none")
    g = norm.weight.data.double()
    for linear in linears:
        w = linear.weight
        _set(w, w.data.double() * g.to(w.device).unsqueeze(0))
        weight_changed(linear)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def fuse_norms_into_linears(model: nn.Module) -> None:
    """In place: fold every RMSNorm weight into the input columns of the linears it feeds and set it to ones.

    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, the final norm -> lm_head (untied from
    embed_tokens first if tied). Exact in full precision (up to rounding); idempotent.
    """
    for layer in decoder_layers(model):
        for norm_path, linear_paths in NORM_LINEARS.items():
            _fold_norm(layer.get_submodule(norm_path), [layer.get_submodule(p) for p in linear_paths])
    untie_lm_head(model)
    _fold_norm(model.model.norm, [model.lm_head])


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, q: Tensor | None = None) -> Tensor:
    """In place: rotate the residual stream by Q = random_hadamard(hidden_size, seed) (or the given orthogonal q);
    return Q (float64, CPU).

    Norm weights are fused into the linears first (:func:`fuse_norms_into_linears`), which rotation needs to be exact.
    Then embed_tokens E ← E Q, readers (q/k/v/gate/up, lm_head) W ← W Q, writers (o_proj, down_proj) W ← Qᵀ W and
    their biases b ← b Q. The model's logits are unchanged up to float rounding.
    """
    fuse_norms_into_linears(model)
    hidden = model.config.hidden_size
    q = random_hadamard(hidden, seed, torch.float64) if q is None else q.double().cpu()
    if q.shape != (hidden, hidden):
        raise ValueError(f"rotation has shape {tuple(q.shape)} but the model's hidden size is {hidden}")

    def read(linear: nn.Module) -> None:
        w = linear.weight
        _set(w, w.data.double() @ q.to(w.device))
        weight_changed(linear)

    def write(linear: nn.Module) -> None:
        w = linear.weight
        _set(w, q.to(w.device).T @ w.data.double())
        if getattr(linear, "bias", None) is not None:
            _set(linear.bias, linear.bias.data.double() @ q.to(linear.bias.device))
        weight_changed(linear)

    embed = model.model.embed_tokens.weight
    _set(embed, embed.data.double() @ q.to(embed.device))
    for layer in decoder_layers(model):
        for path in READ_LINEARS:
            read(layer.get_submodule(path))
        for path in WRITE_LINEARS:
            write(layer.get_submodule(path))
    read(model.lm_head)
    return q
