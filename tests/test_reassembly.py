"""Tests of the channel reassembly (disassembly / assembly / θ search) maths."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from qllm_pipeline.methods.theta_search import search_theta, theta_grid
from qllm_pipeline.quantized.channel_map import ChannelReassembly
from qllm_pipeline.quantized.quantizer import QuantSpec, quantize_activation, quantize_weight
from qllm_pipeline.quantized.reassembly import (
    ChannelPairScorer,
    assemble,
    build_reassembly,
    copies_per_channel,
    disassemble,
    merge_channels,
)

W4 = QuantSpec(bits=4)
A4 = QuantSpec(bits=4)


def make_inputs(n_tokens=256, channels=128, out_features=96, n_outliers=4, outlier_scale=40.0, seed=0):
    """Token activations with a few planted outlier channels (like LLM LayerNorm outputs) and a random weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, channels, generator=g)
    # uneven but moderate channel scales, as in real activations
    x = x * (0.5 + torch.rand(channels, generator=g))
    outliers = torch.randperm(channels, generator=g)[:n_outliers]
    x[:, outliers] *= outlier_scale * (1 + torch.rand(n_outliers, generator=g))
    w = torch.randn(out_features, channels, generator=g) / math.sqrt(channels)
    return x, w, outliers


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def quant_output_error(x, w, r: ChannelReassembly | None, quantize_weights: bool = True):
    """Relative output error of a W4A4 (or W-fp A4) linear, optionally with the reassembly applied first."""
    ref = F.linear(x, w)
    if r is not None:
        x, w = r.apply_to_activation(x), r.apply_to_weight(w)
    if quantize_weights:
        w = quantize_weight(w, W4)
    return rel_err(F.linear(quantize_activation(x, A4), w), ref)


def theta_for_ratio(channel_max, ratio):
    """A θ from the grid that adds some, but at most ratio·C, channels."""
    grid = theta_grid(channel_max, 100, ratio)
    assert len(grid) > 1
    return grid[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Disassembly
# ----------------------------------------------------------------------------------------------------------------------
def test_disassembly_is_exact_and_widens_by_sum_of_copies():
    x, w, outliers = make_inputs()
    m = x.abs().amax(0)
    theta = theta_for_ratio(m, 0.2)
    r = disassemble(m, theta)
    t = torch.clamp(torch.ceil(m.double() / theta), min=1).long()
    assert t[outliers].min() > 1  # the planted outliers really are split
    assert r.out_channels == x.shape[1] + int((t - 1).sum())
    assert r.n_disassembled_extra == int((t - 1).sum()) and r.n_merged == 0
    xr, wr = r.apply_to_activation(x), r.apply_to_weight(w)
    assert xr.shape == (x.shape[0], r.out_channels) and wr.shape == (w.shape[0], r.out_channels)
    assert rel_err(F.linear(xr, wr), F.linear(x, w)) < 1e-5
    # no reassembled channel exceeds θ (up to rounding)
    assert float(xr.abs().amax()) <= theta * (1 + 1e-5)


def test_disassembly_lowers_per_token_quantization_error():
    x, w, _ = make_inputs()
    m = x.abs().amax(0)
    r = disassemble(m, theta_for_ratio(m, 0.2))
    # activation quantization alone: the per-token range shrinks, so the error drops markedly
    base = quant_output_error(x, w, None, quantize_weights=False)
    split = quant_output_error(x, w, r, quantize_weights=False)
    assert split < 0.7 * base, (split, base)
    # W4A4: weight quantization error (untouched by disassembly) adds on top, but the total still drops
    assert quant_output_error(x, w, r) < quant_output_error(x, w, None)


def test_theta_at_max_is_identity():
    x, w, _ = make_inputs()
    m = x.abs().amax(0)
    r = build_reassembly(m, float(m.max()), x, [w])
    assert r.is_identity and r.out_channels == r.in_channels
    assert torch.equal(r.apply_to_activation(x), x) and torch.equal(r.apply_to_weight(w), w)


# ----------------------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------------------
def test_build_reassembly_keeps_width_and_never_merges_outlier_copies():
    x, w, outliers = make_inputs()
    w2 = torch.randn(64, x.shape[1]) / math.sqrt(x.shape[1])  # two linears fed by the same point
    m = x.abs().amax(0)
    theta = theta_for_ratio(m, 0.2)
    t = copies_per_channel(m, theta)
    r = build_reassembly(m, theta, x, [w, w2])
    assert r.out_channels == r.in_channels == x.shape[1]
    assert r.n_merged == r.n_disassembled_extra == int((t - 1).sum()) > 0

    split = (t > 1).nonzero().view(-1)
    assert set(outliers.tolist()) <= set(split.tolist())
    groups = r.group_sizes()
    for c in split.tolist():
        entries = (r.src == c).nonzero().view(-1)
        assert entries.numel() == t[c]  # still T_c copies ...
        assert (groups[r.dst[entries]] == 1).all()  # ... each alone in its output channel
        assert torch.allclose(r.coef[entries], torch.full((int(t[c]),), 1.0 / float(t[c])))
    # merged channels hold only unsplit channels, as means
    merged = (groups > 1).nonzero().view(-1)
    assert merged.numel() > 0
    members = torch.isin(r.dst, merged)
    assert (t[r.src[members]] == 1).all()
    assert torch.allclose(r.coef[members], 1.0 / groups[r.dst[members]].float())
    # the width is restored, and the outliers' range is still reduced
    xr = r.apply_to_activation(x)
    assert float(xr.abs().amax()) < float(m.max()) / 1.5


def test_single_merge_error_matches_documented_formula():
    x, w, _ = make_inputs(channels=32, n_outliers=0)
    r = merge_channels(ChannelReassembly.identity(32), torch.tensor([4]), torch.tensor([9]))
    assert r.out_channels == 31 and r.n_merged == 1
    err = F.linear(r.apply_to_activation(x), r.apply_to_weight(w)) - F.linear(x, w)
    expected = 0.25 * (x[:, 4] - x[:, 9]).square().sum() * (w[:, 4] - w[:, 9]).square().sum()
    assert torch.allclose(err.square().sum(), expected, rtol=1e-4)
    scorer = ChannelPairScorer(x, [w])
    assert torch.allclose(scorer.pair_scores(torch.tensor([4]), torch.tensor([9]))[0, 0], expected, rtol=1e-3)


def test_assembly_score_beats_random_merges():
    x, w, _ = make_inputs(channels=128)
    m = x.abs().amax(0)
    theta = theta_for_ratio(m, 0.2)
    dis = disassemble(m, theta)
    n = dis.n_disassembled_extra
    ref = F.linear(x, w)

    def out_err(r):
        return float((F.linear(r.apply_to_activation(x), r.apply_to_weight(w)) - ref).square().sum())

    chosen = assemble(dis, n, x, [w])
    assert chosen.out_channels == x.shape[1]
    assert out_err(dis) / ref.square().sum() < 1e-10  # disassembly alone is exact: all error comes from merging

    # random merges between the same candidate sets (ordinary channels, even positions into odd positions)
    plain = (dis.copies()[dis.src] == 1)
    pos = torch.arange(dis.out_channels)
    a_pos, b_pos = pos[(pos % 2 == 0) & plain], pos[(pos % 2 == 1) & plain]
    g = torch.Generator().manual_seed(1)
    random_errs = []
    for _ in range(20):
        absorbed = a_pos[torch.randperm(a_pos.numel(), generator=g)[:n]]
        into = b_pos[torch.randint(b_pos.numel(), (n,), generator=g)]
        random_errs.append(out_err(merge_channels(dis, absorbed, into)))
    assert out_err(chosen) < 0.5 * min(random_errs), (out_err(chosen), min(random_errs))


def test_assemble_respects_outlier_mask_and_rejects_impossible_requests():
    x, w, _ = make_inputs(channels=16, n_outliers=0)
    ident = ChannelReassembly.identity(16)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[::3] = True
    r = assemble(ident, 4, x, [w], outlier_mask=mask)
    groups = r.group_sizes()
    touched = r.src[torch.isin(r.dst, (groups > 1).nonzero().view(-1))]
    assert not mask[touched].any()
    with pytest.raises(ValueError):
        assemble(ident, 9, x, [w])  # only 8 even-position channels


# ----------------------------------------------------------------------------------------------------------------------
# θ grid and search
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.05, 0.2])
def test_theta_grid_descending_from_max_within_ratio(ratio):
    x, _, _ = make_inputs(channels=200, n_outliers=6)
    m = x.abs().amax(0)
    steps = 150
    grid = theta_grid(m, steps, ratio)
    assert grid[0] == pytest.approx(float(m.max()))
    assert all(a > b for a, b in zip(grid, grid[1:]))
    assert 1 < len(grid) <= steps
    extra = [int((copies_per_channel(m, th) - 1).sum()) for th in grid]
    assert extra[0] == 0 and max(extra) <= ratio * m.numel()
    if len(grid) < steps:  # truncated exactly where the next candidate would exceed the budget
        step = (float(m.max()) - float(m.min())) / steps
        nxt = float(m.max()) - len(grid) * step
        assert int((copies_per_channel(m, nxt) - 1).sum()) > ratio * m.numel()


def test_search_theta_returns_min_of_its_curve_known_minimum():
    x, w, _ = make_inputs()
    m = x.abs().amax(0)
    ratio = 0.2
    grid = theta_grid(m, 100, ratio)
    extras = sorted({int((copies_per_channel(m, th) - 1).sum()) for th in grid})
    target = extras[len(extras) // 2]
    calls = []

    def loss_fn(r):
        calls.append(r)
        assert r.out_channels == r.in_channels
        return abs(r.n_disassembled_extra - target) + 1.0

    res = search_theta(m, x, [w], loss_fn, steps=100, channel_ratio=ratio)
    assert len(res.curve) == len(grid)
    assert [p["theta"] for p in res.curve] == grid
    assert res.loss == min(p["loss"] for p in res.curve) == 1.0
    assert res.n_extra == target <= ratio * x.shape[1]
    assert res.curve[0]["n_extra"] == 0  # the no-reassembly baseline is evaluated
    assert calls[0].is_identity
    assert len(calls) == len(extras)  # identical copy counts are evaluated once
    assert res.reassembly is not None and res.reassembly.n_disassembled_extra == target
    js = res.to_json()
    assert js["theta"] == res.theta and len(js["curve"]) == len(grid)


def test_search_theta_with_quantization_loss_beats_baseline():
    x, w, _ = make_inputs()
    m = x.abs().amax(0)
    res = search_theta(
        m, x, [w], lambda r: quant_output_error(x, w, r, quantize_weights=False),
        steps=100, channel_ratio=0.2, progress=True,
    )
    losses = [p["loss"] for p in res.curve]
    assert res.loss == min(losses)
    assert res.curve[losses.index(res.loss)]["theta"] == res.theta
    assert 0 < res.n_extra <= 0.2 * x.shape[1]
    assert res.loss < 0.8 * res.curve[0]["loss"]
    # the returned map reproduces the reported loss
    assert quant_output_error(x, w, res.reassembly, quantize_weights=False) == pytest.approx(res.loss)


# ----------------------------------------------------------------------------------------------------------------------
# Persistence, autograd, dtype
# ----------------------------------------------------------------------------------------------------------------------
def test_to_tensors_round_trip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    x, w, _ = make_inputs()
    m = x.abs().amax(0)
    r = build_reassembly(m, theta_for_ratio(m, 0.2), x, [w])
    tensors = r.to_tensors()
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    path = tmp_path / "r.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    r2 = ChannelReassembly.from_tensors(safetensors_torch.load_file(str(path)))
    assert r2.summary() == r.summary()
    assert torch.equal(r2.apply_to_activation(x), r.apply_to_activation(x))
    assert torch.equal(r2.apply_to_weight(w), r.apply_to_weight(w))
    r3 = r.to("cpu")
    assert torch.equal(r3.apply_to_activation(x), r.apply_to_activation(x))


def test_activation_map_is_differentiable_and_keeps_dtype():
    x, w, _ = make_inputs(channels=64)
    m = x.abs().amax(0)
    r = build_reassembly(m, theta_for_ratio(m, 0.2), x, [w])
    xg = x.clone().requires_grad_(True)
    r.apply_to_activation(xg).sum().backward()
    # d(Σ x')/dx_c = Σ of the coefficients of channel c's entries
    expected = torch.zeros(64).index_add_(0, r.src, r.coef)
    assert torch.allclose(xg.grad, expected.expand_as(x))
    xb = x.to(torch.bfloat16).reshape(4, -1, 64)
    yb = r.apply_to_activation(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (4, xb.shape[1], r.out_channels)
    assert rel_err(yb.float(), r.apply_to_activation(x.reshape(4, -1, 64))) < 2e-2
