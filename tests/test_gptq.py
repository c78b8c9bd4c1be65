import pytest
import torch

from qllm_pipeline.methods.gptq import HessianAccumulator, gptq_weight_codes
from qllm_pipeline.quantized.quantizer import QuantSpec, dequantize_weight, weight_codes


def correlated_inputs(n: int = 512, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels (Z @ M) and a few large outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g) @ torch.randn(features, features, generator=g) / features**0.5
    x[:, :4] *= 10.0
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).pow(2).sum().item()


def assert_on_grid(result: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]):
    codes, scale, zero = result["codes"], result["scale"], result["zero"]
    groups = shape[1] // (spec.group_size or shape[1])
    assert codes.shape == shape and scale.shape == zero.shape == (shape[0], groups)
    assert codes.dtype == scale.dtype == zero.dtype == torch.float32
    assert torch.equal(codes, codes.round())
    lo, hi = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
    assert codes.min() >= lo and codes.max() <= hi
    if spec.symmetric:
        assert (zero == 0).all()
    assert torch.isfinite(dequantize_weight(**result)).all()


@pytest.mark.parametrize(
    "spec, act_order",
    [
        (QuantSpec(4), False),
        (QuantSpec(3, group_size=16), False),
        (QuantSpec(4, symmetric=True), False),
        (QuantSpec(3, symmetric=True, group_size=16), False),
        (QuantSpec(4, group_size=16), True),  # static groups come from the original weight, like RTN
    ],
)
def test_diagonal_hessian_equals_rtn(spec, act_order):
    # With a diagonal H, rounding one column says nothing about the others: the OBS update is exactly 0.
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    h = torch.diag(torch.rand(64) + 0.1)
    got = gptq_weight_codes(w, h, spec, block_size=24, act_order=act_order)
    want = weight_codes(w, spec)
    for key in ("codes", "scale", "zero"):
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, act_order):
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    x = correlated_inputs()
    acc = HessianAccumulator(128)
    acc.add(x)
    spec = QuantSpec(bits, group_size=group_size)
    result = gptq_weight_codes(w, acc.hessian(), spec, act_order=act_order)
    assert_on_grid(result, spec, (64, 128))
    gptq_err = output_error(x, w, dequantize_weight(**result))
    rtn_err = output_error(x, w, dequantize_weight(**weight_codes(w, spec)))
    assert gptq_err < 0.5 * rtn_err, (gptq_err, rtn_err)  # about 0.2 here


@pytest.mark.parametrize("act_order", [False, True])
def test_symmetric_gptq_beats_rtn(act_order):
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    x = correlated_inputs(seed=2)
    spec = QuantSpec(4, symmetric=True, group_size=32)
    h = 2 / x.shape[0] * x.double().T @ x.double()
    result = gptq_weight_codes(w, h, spec, act_order=act_order)
    assert_on_grid(result, spec, (32, 128))
    rtn = dequantize_weight(**weight_codes(w, spec))
    assert output_error(x, w, dequantize_weight(**result)) < output_error(x, w, rtn)


def plain_obs_codes(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01) -> torch.Tensor:
    """GPTQ without the Cholesky trick or lazy blocks, in float64: after rounding column i, update the later columns
    with the inverse of H restricted to columns i.. (recomputed every step). Asymmetric specs, act_order off."""
    w, h = w.double().clone(), h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    group = spec.group_size or w.shape[1]
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % group == 0:
            lo, hi = w[:, i : i + group].amin(1, keepdim=True), w[:, i : i + group].amax(1, keepdim=True)
            if spec.group_size is None:  # per-channel params come from the original weight
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            scale = (hi - lo) / (2**spec.bits - 1)
            zero = torch.round(-lo / scale)
        c = torch.clamp(torch.round(w[:, i : i + 1] / scale) + zero, 0, 2**spec.bits - 1)
        codes[:, i] = c[:, 0]
        hinv = torch.linalg.inv(h[i:, i:])
        w[:, i:] -= (w[:, i : i + 1] - (c - zero) * scale) * hinv[0:1] / hinv[0, 0]
    return codes.float()


@pytest.mark.parametrize("group_size", [None, 16, 32])
def test_matches_plain_obs_sweep(group_size):
    # Block sizes that do and do not line up with the groups (group > block too) all give the plain OBS result.
    torch.manual_seed(6)
    w = torch.randn(16, 64)
    x = correlated_inputs(features=64, seed=6)
    h = 2 / x.shape[0] * x.double().T @ x.double()
    spec = QuantSpec(3, group_size=group_size)
    want = plain_obs_codes(w, h, spec)
    for block_size in (128, 24, 7):
        got = gptq_weight_codes(w, h, spec, block_size=block_size)["codes"]
        assert (got != want).float().mean() < 0.01, block_size


def test_block_size_does_not_change_the_math():
    # The lazy block update is exact: block sizes (aligned with the groups or not) only reorder float arithmetic.
    torch.manual_seed(3)
    w = torch.randn(64, 128)
    x = correlated_inputs(seed=3)
    h = 2 / x.shape[0] * x.double().T @ x.double()
    spec = QuantSpec(4, group_size=32)
    ref = gptq_weight_codes(w, h, spec, block_size=128)
    ref_err = output_error(x, w, dequantize_weight(**ref))
    for block_size in (1, 16, 48, 100):
        got = gptq_weight_codes(w, h, spec, block_size=block_size)
        assert (got["codes"] != ref["codes"]).float().mean() < 0.005
        assert torch.allclose(got["scale"], ref["scale"], rtol=1e-3)
        assert output_error(x, w, dequantize_weight(**got)) == pytest.approx(ref_err, rel=1e-2)


def test_hand_computed_two_inputs():
    # One row, 2 inputs, 2-bit asymmetric per-channel. Min-max over [0.3, 3.3]: scale = 3.0 / 3 = 1, zero point
    # round(-0.3 / 1) = 0, grid {0, 1, 2, 3}. RTN: codes [3, 0] (errors 0.3 and 0.3).
    w = torch.tensor([[3.3, 0.3]])
    h = torch.tensor([[9.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    spec = QuantSpec(2)
    assert weight_codes(w, spec)["codes"].tolist() == [[3.0, 0.0]]

    # Damped H: + 0.01 * mean(diag) = 0.05 on the diagonal -> [[9.05, 2], [2, 1.05]].
    damp = 0.01 * (9.0 + 1.0) / 2
    h00, h01, h11 = 9.0 + damp, 2.0, 1.0 + damp
    det = h00 * h11 - h01 * h01
    hinv00, hinv01 = h11 / det, -h01 / det
    # GPTQ rounds w1 = 3.3 to 3 (error 0.3) and compensates in w2 (OLS / OBS update; the Cholesky form is the same):
    w2_new = 0.3 - (3.3 - 3.0) * hinv01 / hinv00  # = 0.3 + 0.3 * 2 / 1.05 ≈ 0.871
    assert w2_new == pytest.approx(0.3 + 0.3 * 2 / 1.05)
    expected_code2 = round(w2_new / 1.0) + 0  # -> 1

    result = gptq_weight_codes(w, h, spec)
    assert expected_code2 == 1
    assert result["codes"].tolist() == [[3.0, float(expected_code2)]]
    assert result["scale"].item() == pytest.approx(1.0) and result["zero"].item() == 0.0
    assert dequantize_weight(**result).flatten().tolist() == pytest.approx([3.0, 1.0])
    # act_order sees column 0 first too (larger diagonal): same answer.
    assert torch.equal(gptq_weight_codes(w, h, spec, act_order=True)["codes"], result["codes"])
    # Swapping the inputs: act_order still rounds the big-diagonal input (now column 1) first.
    swapped = gptq_weight_codes(w.flip(1), h.flip(0, 1), spec, act_order=True)
    assert swapped["codes"].tolist() == [[1.0, 3.0]]


def test_dead_inputs_are_zeroed():
    torch.manual_seed(4)
    w = torch.randn(16, 32)
    x = torch.randn(256, 32)
    x[:, [3, 17]] = 0.0
    h = 2 / 256 * x.double().T @ x.double()
    h_before = h.clone()
    for act_order in (False, True):
        result = gptq_weight_codes(w, h, QuantSpec(4, group_size=8), act_order=act_order)
        w_hat = dequantize_weight(**result)
        assert (w_hat[:, [3, 17]] == 0).all()
        assert torch.isfinite(w_hat).all()
    assert torch.equal(h, h_before)  # the caller's Hessian is not modified


def test_hessian_accumulator_matches_direct():
    torch.manual_seed(5)
    x = torch.randn(3, 10, 16)
    one = HessianAccumulator(16)
    one.add(x)
    batched = HessianAccumulator(16)
    for chunk in (x[0], x[1:2], x[2, :4], x[2, 4:]):
        batched.add(chunk)
    rows = x.reshape(-1, 16).double()
    direct = 2 / rows.shape[0] * rows.T @ rows
    assert one.n_samples == batched.n_samples == 30
    assert one.hessian().dtype == torch.float32 and one.hessian().shape == (16, 16)  # float32 by default
    assert torch.allclose(one.hessian().double(), direct, rtol=1e-5, atol=1e-6)  # float32 products of float32 inputs
    assert torch.allclose(batched.hessian().double(), direct, rtol=1e-5, atol=1e-6)
    assert one.hessian() is one.hessian()  # scaled in place once, not copied
    exact = HessianAccumulator(16, dtype=torch.float64)
    exact.add(x.double())  # float64 inputs into a float64 sum: float64 products
    assert torch.allclose(exact.hessian(), direct, rtol=1e-12, atol=1e-12)
    half = HessianAccumulator(16)
    half.add(x.to(torch.float16))  # low-precision inputs are multiplied in float32
    assert half.hessian().dtype == torch.float32 and half.n_samples == 30
    with pytest.raises(ValueError, match="already scaled"):
        one.add(x)


def test_hessian_does_not_depend_on_how_the_batches_are_grouped():
    """What a data-parallel job's ranks rely on: two ranks' sums added equal one process's running sum, bit for bit."""
    torch.manual_seed(6)
    batches = [torch.randn(4, 32, 24) * scale for scale in (1.0, 30.0, 0.01, 3.0)]
    one = HessianAccumulator(24)
    for b in batches:
        one.add(b)
    ranks = [HessianAccumulator(24), HessianAccumulator(24)]
    for i, b in enumerate(batches):
        ranks[i // 2].add(b)
    ranks[0]._sum += ranks[1]._sum  # what all_reduce does
    ranks[0]._n += ranks[1]._n
    assert torch.equal(one.hessian(), ranks[0].hessian())


def test_bad_inputs_raise():
    w = torch.randn(8, 16)
    h = torch.eye(16)
    with pytest.raises(ValueError, match=r"hessian shape \(12, 12\) does not match the weight's in_features=16"):
        gptq_weight_codes(w, torch.eye(12), QuantSpec(4))
    with pytest.raises(ValueError, match="group_size=5 does not divide in_features=16"):
        gptq_weight_codes(w, h, QuantSpec(4, group_size=5))
    with pytest.raises(ValueError, match="2-D"):
        gptq_weight_codes(w.reshape(2, 4, 16), h, QuantSpec(4))
    with pytest.raises(ValueError, match="bits is None"):
        gptq_weight_codes(w, h, QuantSpec(None))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_weight_codes(w, -torch.eye(16), QuantSpec(4), damp=0.0)
    acc = HessianAccumulator(16)
    with pytest.raises(ValueError, match="no samples"):
        acc.hessian()
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 16\]"):
        acc.add(torch.randn(4, 8))


def float64_reference_factor(hessian, damp=0.01, act_order=False, device=None):
    """The factorization as it was before it was made lean: the Hessian in float64, H⁻¹ through a Cholesky and a
    triangular inverse, then the upper Cholesky factor of H⁻¹ (three C × C float64 matrices at once)."""
    from qllm_pipeline.methods.gptq import InverseFactor

    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    L = torch.linalg.cholesky(H[perm][:, perm])
    L_inv = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=L.dtype), upper=False)
    return InverseFactor(perm, torch.linalg.cholesky(L_inv.T @ L_inv, upper=True).float(), dead)


@pytest.mark.parametrize("act_order", [False, True])
def test_lean_factor_matches_the_float64_reference(act_order):
    from qllm_pipeline.methods import gptq

    x = correlated_inputs(600, 96, seed=7)
    x[:, 5] = 0.0  # a dead input
    acc = HessianAccumulator(96)
    acc.add(x)
    got = gptq.inverse_factor(acc.hessian(), 0.01, act_order)
    want = float64_reference_factor(acc.hessian(), 0.01, act_order)
    assert torch.equal(got.perm, want.perm) and torch.equal(got.dead, want.dead)
    assert got.U.dtype == torch.float32 and torch.allclose(got.U, want.U, rtol=1e-5, atol=1e-6 * want.U.abs().max().item())
    assert torch.equal(got.U, got.U.triu())


def test_gptq_on_a_model_block_gives_the_float64_codes(monkeypatch):
    """The pipeline's GPTQ (float32 Hessian sums, the in-place float64 factorization, one factor per input group) rounds
    a tiny model's blocks to the same codes as float64 sums with the reference factorization per projection."""
    from conftest import tiny_model
    from qllm_pipeline.methods import weight_rounding
    from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers, quant_linears
    from qllm_pipeline.quantized.qblock import make_quant_block

    model = tiny_model(layers=2)
    runner = BlockRunner(model, 32, "cpu")
    hidden = torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(0)) * 3
    cfg = weight_rounding.GPTQConfig()

    def codes(block):
        return {n: ql.codes["codes"] for n, ql in quant_linears(block).items()}

    got, want = [], []
    for layer in decoder_layers(model):
        block = make_quant_block(layer, QuantSpec(4), QuantSpec(8))
        weight_rounding.gptq_fuse_block(block, runner, hidden, "cpu", 4, cfg)
        got.append(codes(block))
    with monkeypatch.context() as patch:
        patch.setattr(weight_rounding, "HessianAccumulator", lambda n: HessianAccumulator(n, dtype=torch.float64))
        patch.setattr(weight_rounding, "inverse_factor", float64_reference_factor)
        for layer in decoder_layers(model):
            block = make_quant_block(layer, QuantSpec(4), QuantSpec(8))
            weight_rounding.gptq_fuse_block(block, runner, hidden, "cpu", 4, cfg)
            want.append(codes(block))
    for mine, ref in zip(got, want):
        for name in ref:
            assert torch.equal(mine[name], ref[name]), name


def test_weight_rounding_registry():
    """What the stages ask of a rounding: round-to-nearest adds nothing to the cache keys (the keys of runs made before
    the registry), reads no inputs and no FP stream; GPTQ keys its settings with its arithmetic's version (fp_target
    at 0 left out), reads the FP stream only when fp_target > 0; an unknown name is one error naming the choices."""
    from qllm_pipeline.core.errors import PipelineError
    from qllm_pipeline.methods.weight_rounding import GPTQ_ARITHMETIC_VERSION, WEIGHT_ALGORITHMS, weight_rounding

    gptq_settings = {"damp": 0.01, "block_size": 128, "act_order": True, "clip": True, "fp_target": 0.0}
    rtn = weight_rounding({"quant": {"weight_algorithm": "rtn"}, "gptq": gptq_settings})
    assert WEIGHT_ALGORITHMS == ("rtn", "gptq") and rtn.name == "rtn" and rtn.label is None
    assert rtn.key({}) == {} and not rtn.reads_inputs and not rtn.needs_fp_stream({})
    with pytest.raises(NotImplementedError):
        rtn.round_block(None, None, None, "cpu", 1, {})
    cfg = {"quant": {"weight_algorithm": "gptq"}, "gptq": gptq_settings}
    gptq = weight_rounding(cfg)
    assert gptq.label == "gptq" and gptq.reads_inputs and not gptq.needs_fp_stream(cfg)
    assert gptq.key(cfg) == {"gptq": {"damp": 0.01, "block_size": 128, "act_order": True, "clip": True,
                                      "arithmetic": GPTQ_ARITHMETIC_VERSION}}
    assert gptq.needs_fp_stream({**cfg, "gptq": {**gptq_settings, "fp_target": 0.5}})
    with pytest.raises(PipelineError, match=r"^gptq.damp=2 is out of range: >= 0 and < 1$"):
        gptq.validate({**cfg, "gptq": {**gptq_settings, "damp": 2}})
    with pytest.raises(PipelineError, match=r"quant.weight_algorithm='awq' is not one of \['rtn', 'gptq'\]"):
        weight_rounding({"quant": {"weight_algorithm": "awq"}})
