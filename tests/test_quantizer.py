import pytest
import torch

from qllm_pipeline.quantized.quantizer import (
    QuantSpec,
    activation_quant_params,
    dequantize,
    quant_params,
    quantize_activation,
    quantize_lastdim,
    quantize_tokens,
    quantize_weight,
)


def test_exact_grid_values_asymmetric():
    x = torch.tensor([[-1.0, 0.4, 2.0, 0.6]])
    # 2 bits over [-1, 2]: scale 1, zero point 1 -> grid {-1, 0, 1, 2}
    assert torch.equal(quantize_lastdim(x, 2), torch.tensor([[-1.0, 0.0, 2.0, 1.0]]))


def test_exact_grid_values_symmetric():
    x = torch.tensor([[-4.0, 1.2, 3.5, 0.2]])
    # 3 bits symmetric: scale = 4/3, integers in [-4, 3]
    q = quantize_lastdim(x, 3, symmetric=True)
    scale = 4.0 / 3.0
    assert torch.allclose(q, torch.tensor([[-3 * scale, 1 * scale, 3 * scale, 0.0]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
def test_round_trip_error_bound_and_levels(bits):
    torch.manual_seed(bits)
    x = torch.randn(16, 257) * torch.rand(16, 1) * 10
    q = quantize_lastdim(x, bits)
    scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    assert ((q - x).abs() <= scale / 2 + 1e-5 * x.abs().amax()).all()
    for row in q:
        assert row.unique().numel() <= 2**bits
    if bits == 16:
        assert (q - x).abs().max() < 1e-3


def test_error_shrinks_with_bits():
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    errors = [(quantize_lastdim(x, b) - x).pow(2).mean().item() for b in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True)


def test_activation_is_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    q = quantize_activation(x, QuantSpec(4))
    assert q.shape == x.shape
    y = x.clone()
    y[0, 3] *= 100  # an outlier token must not change any other token's quantization
    qy = quantize_activation(y, QuantSpec(4))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3] = False
    assert torch.equal(q[mask], qy[mask])
    assert not torch.equal(q[0, 3], qy[0, 3])


def test_weight_is_per_output_channel_and_grouped():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = quantize_weight(w, QuantSpec(4))
    w2 = w.clone()
    w2[2, 5] = 50.0
    q2 = quantize_weight(w2, QuantSpec(4))
    assert torch.equal(torch.cat([q[:2], q[3:]]), torch.cat([q2[:2], q2[3:]]))
    g = quantize_weight(w2, QuantSpec(4, group_size=16))
    # only the group holding the outlier gets a wide range; other groups of that row stay fine
    assert (g[2, 16:] - w2[2, 16:]).abs().max() < (q2[2, 16:] - w2[2, 16:]).abs().max()
    for row in g:
        for group in row.view(4, 16):
            assert group.unique().numel() <= 16


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 30), QuantSpec(4, group_size=16))


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="outside 2..16"):
        QuantSpec(bits)


def test_disabled_spec_is_identity():
    x = torch.randn(3, 7)
    assert quantize_activation(x, QuantSpec(None)) is x


def test_straight_through_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    quantize_lastdim(x, 3).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_activation_clip_ratio_shrinks_the_range_and_clamps_outliers():
    x = torch.tensor([[-1.0, 0.4, 2.0, 0.6]])
    # 2 bits over [-1, 2] · 0.5 = [-0.5, 1]: scale 0.5, zero 1 -> grid {-0.5, 0, 0.5, 1}; -1 and 2 clamp to the ends
    q = quantize_activation(x, QuantSpec(2, clip_ratio=0.5))
    assert torch.equal(q, torch.tensor([[-0.5, 0.5, 1.0, 0.5]]))
    assert torch.equal(quantize_activation(x, QuantSpec(2, clip_ratio=1.0)), quantize_tokens(x, 2))


def test_activation_clip_ratio_lowers_error_on_gaussian_tokens():
    # Rotated activations are near-Gaussian: the extreme values of 512 channels waste a 4-bit grid, a mild clip
    # helps, a hard one hurts (why the ratio is a setting and not a constant).
    torch.manual_seed(0)
    x = torch.randn(64, 512)
    errors = {r: (quantize_activation(x, QuantSpec(4, clip_ratio=r)) - x).pow(2).mean().item() for r in (1.0, 0.9, 0.5)}
    assert errors[0.9] < errors[1.0] < errors[0.5]


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_clip_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"a_clip_ratio=.* must be in \(0, 1\]"):
        QuantSpec(4, clip_ratio=ratio)


def _tokens_of_both_signs_and_of_one(seed: int = 0) -> torch.Tensor:
    # [1, tokens, channels] as transformers feeds a Linear: 4096 tokens of 576 channels at many scales (millions of
    # values, so some land within float32's spacing of a rounding tie), the last 64 tokens all positive
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4096, 576, generator=g) * torch.rand(1, 4096, 1, generator=g) * 3
    x[:, -64:] = x[:, -64:].abs() + 0.5
    return x


@pytest.mark.parametrize("bits", [8, 4])
def test_activation_quantizer_is_compressed_tensors_bit_for_bit(bits):
    """Stock transformers runs compressed-tensors' dynamic per-token quantizer on an exported checkpoint's
    activations: ours (and the one in the shipped modeling file) must give the same values, ties included."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from qllm_pipeline.export.remote_modeling import fake_quantize as shipped_fake_quantize

    x = _tokens_of_both_signs_and_of_one()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="token", dynamic=True)
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, torch.nn.Identity())
    reference = fake_quantize(x, scale, zero_point, args)
    assert torch.equal(quantize_tokens(x, bits), reference)
    assert torch.equal(shipped_fake_quantize(x, bits, False), reference)
    if bits == 8:
        # The data reaches rounding ties: round(x/s) + z (the weights' arithmetic) differs on tokens of both signs
        # too, not only on the one-sign tokens whose range compressed-tensors widens to include 0. (At 4 bits x/s + z
        # is small, float32 resolves it finely, and such ties are too rare for this sample.)
        weights_arithmetic = dequantize(*quant_params(x, bits))
        assert (weights_arithmetic[:, :-64] != reference[:, :-64]).any()


def test_activation_range_includes_zero():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # one sign: the grid still spans 0 (0 stays exact for padding and sparsity)
    codes, scale, zero = activation_quant_params(x, 2)
    assert torch.equal(scale, torch.tensor([[4.0 / 3]])) and torch.equal(zero, torch.tensor([[0.0]]))
    assert torch.equal(codes, torch.tensor([[1.0, 2.0, 2.0, 3.0]]))


def test_rows_of_one_sign_get_a_storable_zero_point():
    """compressed-tensors stores an asymmetric zero point in int8 on its signed grid: a row of one sign takes its
    range widened to include 0 (its zero point in [0, 2^b - 1]); rows of both signs keep their min-max grid exactly."""
    from qllm_pipeline.quantized.quantizer import clipped_quant_params, dequantize, quant_params

    torch.manual_seed(0)
    mixed = torch.randn(4, 64)
    rows = torch.cat([mixed, torch.rand(2, 64) + 0.5, -(torch.rand(1, 64) + 0.5)])  # two positive rows, one negative
    for fn in (quant_params, clipped_quant_params):
        codes, scale, zero = fn(rows, 8)
        assert 0 <= float(zero.min()) and float(zero.max()) <= 255
        assert (dequantize(codes, scale, zero) - rows).abs().le(scale / 2 + 1e-6).all()  # still on its grid, no clamping
        alone = fn(mixed, 8)
        for got, want in zip((codes[:4], scale[:4], zero[:4]), alone):
            assert torch.equal(got, want)
    _, _, zero4 = quant_params(rows, 4)
    assert float(zero4.min()) < 0  # at 4 bits the one-sign rows' zero points still fit int8: their grid is kept
