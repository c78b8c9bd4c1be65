"""GPTQ with the FP model's output as the target (gptq.fp_target, GPTAQ's asymmetric calibration)."""
import pytest
import torch
from test_gptq import correlated_inputs

from conftest import tiny_model
from qllm_pipeline.methods.gptq import HessianAccumulator, fp_target_weight, gptq_weight_codes
from qllm_pipeline.methods.weight_rounding import GPTQConfig, gptq_fuse_block
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers, quant_linears
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec, dequantize_weight


def _stats(x, x_fp):
    acc = HessianAccumulator(x.shape[1])
    for part, part_fp in zip(x.split(100), x_fp.split(100)):  # in batches, as the pipeline adds them
        acc.add(part, part_fp)
    return acc.hessian(), acc.cross()


def test_cross_term_matches_direct_product_and_needs_pairs():
    x, x_fp = correlated_inputs(300, 16, seed=1), correlated_inputs(300, 16, seed=2)
    h, c = _stats(x, x_fp)
    assert torch.allclose(h.double(), 2 * x.double().T @ x.double() / 300, rtol=1e-5)
    assert torch.allclose(c.double(), 2 * x.double().T @ x_fp.double() / 300, rtol=1e-5, atol=1e-6)
    acc = HessianAccumulator(16)
    acc.add(x[:10], x_fp[:10])
    with pytest.raises(ValueError, match="pass x_fp with every batch or with none"):
        acc.add(x[10:20])
    with pytest.raises(ValueError, match="no FP inputs were added"):
        HessianAccumulator(16).cross()


def test_same_inputs_give_back_the_weight():
    x = correlated_inputs(400, 32)
    w = torch.randn(8, 32)
    h, c = _stats(x, x)
    assert torch.allclose(fp_target_weight(w, h, c, damp=0.01), w, atol=1e-5)


def test_recovers_the_weight_that_undoes_a_linear_distortion():
    # The FP inputs are a linear map of the ones the layer sees: x_fp = x Aᵀ, so W·x_fp = (W A)·x exactly.
    g = torch.Generator().manual_seed(0)
    x = correlated_inputs(2000, 24, seed=3).double()
    a = torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(6, 24, generator=g, dtype=torch.float64)
    h, c = _stats(x, x @ a.T)
    assert torch.allclose(fp_target_weight(w, h, c, damp=1e-9), w @ a, atol=1e-5)
    # The ridge pulls toward W: a large damping leaves nearly W itself.
    far = fp_target_weight(w, h, c, damp=1e3)
    assert (far - w).norm() < 0.01 * (w @ a - w).norm()


@pytest.mark.parametrize("bits", [3, 4])
def test_rounding_the_fp_target_weight_lowers_the_error_against_the_fp_output(bits):
    """Inputs distorted by earlier layers' errors (per-channel gain and noise): GPTQ of W* beats GPTQ of W on
    ||x Qᵀ - x_fp Wᵀ||, the error the model sees."""
    g = torch.Generator().manual_seed(1)
    x_fp = correlated_inputs(1024, 64, seed=4)
    x = x_fp * (1 + 0.2 * torch.randn(64, generator=g)) + 0.05 * torch.randn(1024, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    h, c = _stats(x, x_fp)
    spec = QuantSpec(bits)
    errors = {}
    for name, target in (("gptq", w), ("gptaq", fp_target_weight(w, h, c))):
        q = dequantize_weight(**gptq_weight_codes(target, h, spec, act_order=True))
        errors[name] = (x @ q.T - x_fp @ w.T).pow(2).mean().item()
    assert errors["gptaq"] < 0.9 * errors["gptq"]


def test_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        fp_target_weight(torch.randn(4, 8), torch.eye(8), torch.eye(7))
    with pytest.raises(ValueError, match=r"^gptq.fp_target=1.5 is out of range: a number in \[0, 1\]: 0 = GPTQ, 1 = GPTAQ$"):
        GPTQConfig(fp_target=1.5)


def test_block_matches_the_fp_block_better_on_a_drifted_stream():
    """A block whose inputs drifted from the FP stream (as after quantized blocks): rounding toward the FP block's
    layers on the FP stream brings the block output closer to the FP block's output than plain GPTQ."""
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 32, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x_fp = model.get_input_embeddings()(torch.randint(0, 128, (16, 32), generator=g))
        x_q = x_fp + 0.3 * x_fp.std() * torch.randn(x_fp.shape, generator=g)
        target = runner(layer, x_fp)
    errors = {}
    for alpha in (0.0, 1.0):
        block = make_quant_block(layer, QuantSpec(4), QuantSpec(8))
        gptq_fuse_block(block, runner, x_q, "cpu", 4, GPTQConfig(fp_target=alpha), fp=(layer, x_fp))
        with torch.no_grad():
            errors[alpha] = float((runner(block, x_q) - target).pow(2).mean())
    assert errors[1.0] < errors[0.0]
    # fp_target=0 ignores the FP inputs: the same codes as without them.
    plain, with_fp = (make_quant_block(layer, QuantSpec(4), QuantSpec(8)) for _ in range(2))
    gptq_fuse_block(plain, runner, x_q, "cpu", 4, GPTQConfig())
    gptq_fuse_block(with_fp, runner, x_q, "cpu", 4, GPTQConfig(), fp=(layer, x_fp))
    for name, ql in quant_linears(plain).items():
        assert torch.equal(ql.weight, quant_linears(with_fp)[name].weight), name
    with pytest.raises(ValueError, match="needs the FP block"):
        gptq_fuse_block(make_quant_block(layer, QuantSpec(4), QuantSpec(8)), runner, x_q, "cpu", 4, GPTQConfig(fp_target=1.0))


def test_fuse_key_leaves_out_the_default_fp_target():
    """gptq.fp_target at its default keys like a config without the setting; a non-default value changes the key."""
    from qllm_pipeline.stages.fuse import Fuse

    base = {"quant": {"wbits": 4, "weight_algorithm": "gptq"}, "gptq": {"damp": 0.01, "block_size": 128,
                                                                      "act_order": True, "clip": True}}
    with_default = {**base, "gptq": {**base["gptq"], "fp_target": 0.0}}
    with_value = {**base, "gptq": {**base["gptq"], "fp_target": 1.0}}
    assert Fuse().key_config(with_default) == Fuse().key_config(base)
    assert Fuse().key_config(with_value) != Fuse().key_config(base)
    assert not Fuse().needs_fp_stream(with_default) and Fuse().needs_fp_stream(with_value)


def test_pipeline_gptq_with_fp_target_tracks_the_fp_stream(tiny_model_dir, tmp_path):
    from conftest import read_results, run_cli, tiny_overrides

    cache = tmp_path / "cache"
    ppl, computed = {}, {}
    for alpha in ("0.0", "1.0"):
        run = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / alpha), "method=gptq", f"gptq.fp_target={alpha}"])
        assert run.returncode == 0, run.stderr[-3000:]
        results = read_results(tmp_path / alpha)
        rows = {row["stage"]: row for row in results["stages"]}
        computed[alpha] = rows["fuse"]["computed"]
        ppl[alpha] = results["ppl"]["wiki_sample"]
    assert computed["1.0"] == computed["0.0"] > 0  # a different key: no fused block reused from the fp_target=0 run
    assert ppl["0.0"]["fp"] == ppl["1.0"]["fp"]
    assert ppl["0.0"] != ppl["1.0"]  # the quantized rows differ: the FP inputs were used


def test_plan_counts_the_fp_stream_and_the_cross_term(tmp_path):
    import json

    from conftest import run_cli

    plans = {}
    for alpha in ("0.0", "1.0"):
        proc = run_cli(["model=llama2_7b", "method=gptq", f"gptq.fp_target={alpha}", "pipeline.plan_only=true",
                        f"hydra.run.dir={tmp_path}/{alpha}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        plans[alpha] = json.loads((tmp_path / alpha / "plan.json").read_text())
    plain, fp = plans["0.0"], plans["1.0"]
    assert fp["resident"]["streams"] == plain["resident"]["streams"] * 3 // 2  # the FP stream beside the two
    assert fp["host_per_stage"]["fuse"] > plain["host_per_stage"]["fuse"]  # GPTQ rounds in fuse here
    assert fp["stage_working_sets"]["fuse"] > plain["stage_working_sets"]["fuse"]  # FP block, cross term, ridge solve


def test_fuse_key_carries_the_gptq_arithmetic():
    """Blocks rounded by an earlier GPTQ arithmetic (float32 running Hessian sums) are not reused: the key carries its version."""
    from qllm_pipeline.methods import weight_rounding
    from qllm_pipeline.stages.fuse import Fuse

    cfg = {"quant": {"wbits": 4, "weight_algorithm": "gptq"}, "gptq": {"damp": 0.01}}
    now = Fuse().key_config(cfg)
    assert now["gptq"]["arithmetic"] == weight_rounding.GPTQ_ARITHMETIC_VERSION == 3
    assert Fuse().key_config({**cfg, "quant": {"wbits": 4, "weight_algorithm": "rtn"}}).get("gptq") is None
