"""Block-wise execution equals the whole-model forward; fused blocks and saved models reproduce what was computed."""
import math

import pytest
import torch

from conftest import tiny_model
from qllm_pipeline.evaluation.perplexity import blockwise_perplexity
from qllm_pipeline.export.packed import load_quantized_model, pack_codes, save_quantized_model, unpack_codes
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers, quant_linears
from qllm_pipeline.quantized.fused import build_fused_block, fused_block_tensors
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec, dequantize_weight, quantize_weight, weight_codes
from qllm_pipeline.quantized.reassembly import build_reassembly

W4, A4 = QuantSpec(4), QuantSpec(4)


def test_blockwise_perplexity_matches_model_loss():
    model = tiny_model()
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    got = blockwise_perplexity(model, ids, {"fp": lambda i: decoder_layers(model)[i]}, torch.device("cpu"), batch_size=4, progress=False)
    assert abs(got["fp"] - expected) / expected < 1e-5


def _fused_rtn_blocks(model, with_reassembly=False):
    blocks = []
    for layer in decoder_layers(model):
        maps = None
        if with_reassembly:
            m = torch.rand(64) + torch.tensor([8.0] * 3 + [0.0] * 61)
            tokens = torch.randn(32, 64)
            maps = {"qkv": build_reassembly(m, 3.0, tokens, [layer.self_attn.q_proj.weight])}
        block = make_quant_block(layer, W4, A4, maps)
        reference = block
        for ql in quant_linears(block).values():
            ql.fuse()
        blocks.append((reference, fused_block_tensors(block)))
    return blocks


def test_fused_block_rebuilds_exactly():
    model = tiny_model()
    runner = BlockRunner(model, 16, "cpu")
    x = torch.randn(2, 16, 64)
    layer = decoder_layers(model)[0]
    block = make_quant_block(layer, W4, A4)
    with torch.no_grad():
        before = runner(block, x)
    for ql in quant_linears(block).values():
        ql.fuse()
    rebuilt = build_fused_block(layer, fused_block_tensors(block), A4, W4)
    with torch.no_grad():
        assert torch.equal(runner(block, x), before)
        assert torch.equal(runner(rebuilt, x), before)


def test_saved_model_reloads_with_equal_perplexity(tmp_path):
    model = tiny_model()
    fused = [t for _, t in _fused_rtn_blocks(model, with_reassembly=True)]
    sizes = save_quantized_model(model, None, fused, {"wbits": 4, "abits": 4}, tmp_path / "q")
    layers = decoder_layers(model)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    ours = blockwise_perplexity(model, ids, {"q": lambda i: build_fused_block(layers[i], fused[i], A4, W4)}, cpu, progress=False)
    loaded = load_quantized_model(tmp_path / "q")
    again = blockwise_perplexity(loaded, ids, {"q": lambda i: decoder_layers(loaded)[i]}, cpu, progress=False)
    assert again["q"] == ours["q"]  # exactly: the weights are the same dequantized codes
    assert loaded.model.layers[0].self_attn.q_proj.reassembly is not None
    with torch.no_grad():  # and the ordinary HF forward of the loaded model agrees
        assert abs(math.exp(loaded(ids, labels=ids).loss.item()) - ours["q"]) / ours["q"] < 1e-5
    assert sizes["file_bytes"] < sizes["fp16_bytes"] * 2  # fp32 embeddings dominate this tiny model; blocks are packed


@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (4, True), (6, False), (8, True), (12, False)])
def test_pack_unpack_round_trip(bits, symmetric):
    w = torch.randn(5, 33)  # odd width exercises the padding of 4-bit packing
    codes = weight_codes(w, QuantSpec(bits, symmetric))["codes"]
    packed = pack_codes(codes, bits, symmetric)
    if bits <= 4:
        assert packed.dtype == torch.uint8 and packed.shape == (5, 17)
    assert torch.equal(unpack_codes(packed, bits, symmetric, 33), codes)


def test_weight_codes_dequantize_bit_exactly():
    w = torch.randn(16, 64)
    for spec in (QuantSpec(4), QuantSpec(3, True), QuantSpec(4, group_size=16)):
        assert torch.equal(dequantize_weight(**weight_codes(w, spec)), quantize_weight(w, spec))
