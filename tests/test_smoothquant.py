"""SmoothQuant on one LLaMA decoder block: the scale formula, exactness in full precision, and less quantization error."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_config
from qllm_pipeline.methods.smoothquant import smooth_block, smoothing_scales
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec

VOCAB, SEQ = 100, 32
HOOKED = ("self_attn.q_proj", "mlp.gate_proj")


def outlier_model(seed: int = 0) -> LlamaForCausalLM:
    """Tiny random LLaMA whose norm outputs have planted outlier channels (norm weights ×20 on a few channels)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size=VOCAB)).eval()
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.input_layernorm.weight[:3] *= 20.0
            layer.post_attention_layernorm.weight[5:8] *= 20.0
    return model


def block_inputs(model, seed: int = 0, batch: int = 8) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.model.embed_tokens(ids)


def measure_act_max(block, runner, hidden) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of the inputs of q_proj and gate_proj, via forward pre-hooks."""
    act_max: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            act_max[name] = x if name not in act_max else torch.maximum(act_max[name], x)

        return record

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in HOOKED]
    try:
        with torch.no_grad():
            runner(block, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return act_max


def flatness(channel_max: torch.Tensor) -> float:
    return float(channel_max.max() / channel_max.median())


@pytest.fixture(scope="module")
def setup():
    model = outlier_model()
    runner = BlockRunner(model, SEQ, "cpu")
    hidden = block_inputs(model)
    block = decoder_layers(model)[0]
    act_max = measure_act_max(block, runner, hidden)
    smoothed = copy.deepcopy(block)
    scales = smooth_block(smoothed, act_max, alpha=0.5)
    return model, runner, hidden, block, smoothed, act_max, scales


def test_smoothing_scales_formula_and_clamps():
    g = torch.Generator().manual_seed(0)
    act = torch.rand(16, generator=g) * 10 + 0.1
    w1, w2 = torch.randn(8, 16, generator=g), torch.randn(12, 16, generator=g)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_scales(act, [w1, w2], alpha)
        w_max = torch.cat([w1, w2]).abs().amax(dim=0)
        expected = act**alpha / w_max ** (1 - alpha)
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    # one linear only: only its own columns count
    torch.testing.assert_close(smoothing_scales(act, [w1]), (act / w1.abs().amax(dim=0)).sqrt(), rtol=1e-6, atol=0)
    # a dead activation channel gets the floor 1e-5; a zero weight column is clamped to 1e-5 before dividing
    act0 = act.clone()
    act0[2] = 0.0
    w0 = w1.clone()
    w0[:, 5] = 0.0
    s = smoothing_scales(act0, [w0], 0.5)
    assert s[2].item() == pytest.approx(1e-5)
    assert s[5].item() == pytest.approx(act[5].sqrt().item() / 1e-5**0.5, rel=1e-5)
    with pytest.raises(ValueError):
        smoothing_scales(act[:10], [w1])
    with pytest.raises(ValueError):
        smoothing_scales(act, [w1], alpha=1.5)


def test_smooth_block_is_exact_in_full_precision(setup):
    model, runner, hidden, block, smoothed, act_max, scales = setup
    assert set(scales) == {"qkv", "gate_up"}
    # the scales are far from trivial: the planted outlier channels get much larger ones
    for point, outliers in (("qkv", slice(0, 3)), ("gate_up", slice(5, 8))):
        s = scales[point]
        assert s.shape == (64,)
        assert s[outliers].min() > 2 * s.median()
    torch.testing.assert_close(smoothed.input_layernorm.weight, block.input_layernorm.weight / scales["qkv"])
    torch.testing.assert_close(smoothed.mlp.up_proj.weight, block.mlp.up_proj.weight * scales["gate_up"])
    with torch.no_grad():
        ref, out = runner(block, hidden), runner(smoothed, hidden)
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    # the transform is not a no-op on the linears' inputs: the outlier channels are flattened
    after = measure_act_max(smoothed, runner, hidden)
    for name in HOOKED:
        assert flatness(after[name]) < flatness(act_max[name]) / 3


@pytest.mark.parametrize("abits", [8, 6])
def test_smoothing_lowers_quantized_block_error(setup, abits):
    model, runner, hidden, block, smoothed, _, _ = setup
    with torch.no_grad():
        ref = runner(block, hidden)
    errors = {}
    for name, fp_block in (("plain", block), ("smoothed", smoothed)):
        qblock = make_quant_block(fp_block, QuantSpec(8), QuantSpec(abits))
        with torch.no_grad():
            out = runner(qblock, hidden)
        # error relative to what the block adds to the residual stream (the residual itself is not quantized)
        errors[name] = float((out - ref).norm() / (ref - hidden).norm())
    print(f"W8A{abits} block error: plain {errors['plain']:.4f}, smoothed {errors['smoothed']:.4f}")
    assert errors["smoothed"] < 0.8 * errors["plain"]


def test_smooth_block_needs_both_act_maxima(setup):
    _, _, _, block, _, act_max, _ = setup
    with pytest.raises(KeyError, match="mlp.gate_proj"):
        smooth_block(copy.deepcopy(block), {"self_attn.q_proj": act_max["self_attn.q_proj"]}, 0.5)
