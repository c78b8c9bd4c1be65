"""Complete rotation (R2, online R4 / o_proj / QK Hadamards), the ordered input transforms of a projection, the
attention-input quantizer and GPTQ-based low-rank refinement: exact where they must be, active where they must be."""
import copy
import math

import pytest
import torch

from conftest import tiny_model
from qllm_pipeline.methods.rotation import add_online_hadamard, add_online_qk_hadamard, rotate_model, rotate_value_heads
from qllm_pipeline.methods.weight_rounding import GPTQConfig, gptq_base_block, gptq_fuse_block
from qllm_pipeline.quantized.attention import attention_quantized
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers, quant_linears
from qllm_pipeline.quantized.fused import build_fused_block, fused_block_tensors
from qllm_pipeline.quantized.hadamard import OnlineHadamard, hadamard_factors
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec, dequantize_weight, quantize_weight
from qllm_pipeline.quantized.reassembly import build_reassembly

W4, A4 = QuantSpec(4), QuantSpec(4)


@pytest.mark.parametrize("n", [12, 64, 576, 1536, 2048])
def test_online_hadamard_is_an_exact_hadamard_and_its_fast_path_matches_the_matrix(n):
    h = OnlineHadamard(n)
    m = h.matrix()
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=m.dtype), atol=1e-12)
    assert torch.allclose(m.abs(), torch.full_like(m, 1 / math.sqrt(n)), atol=1e-12)  # entries ±1/√n: a true Hadamard
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(h.apply_to_activation(x), x @ m, atol=1e-10)
    w = torch.randn(7, n, dtype=torch.float64)
    # exact product: (x H)(W H)ᵀ = x Wᵀ
    assert torch.allclose(h.apply_to_activation(x) @ h.apply_to_weight(w).T, x @ w.T, atol=1e-9)


def test_online_hadamard_refuses_an_order_it_cannot_build():
    assert hadamard_factors(100) is None
    with pytest.raises(ValueError, match="no Hadamard matrix of order 100"):
        OnlineHadamard(100)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("parts", [("value_heads",), ("online_down",), ("online_o",), ("online_qk",), ("all",)])
def test_each_rotation_part_is_exact_in_fp(parts):
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    rotated = copy.deepcopy(model)
    if parts == ("all",):
        rotate_model(rotated, seed=1)
        parts = ("value_heads", "online_down", "online_o", "online_qk")
    if "value_heads" in parts:
        rotate_value_heads(rotated)
    if "online_down" in parts:
        add_online_hadamard(rotated, "mlp.down_proj")
    if "online_o" in parts:
        add_online_hadamard(rotated, "self_attn.o_proj")
    if "online_qk" in parts:
        add_online_qk_hadamard(rotated)
    assert torch.allclose(_logits(rotated, ids), _logits(model, ids), atol=1e-5)
    if "value_heads" in parts:  # really folded into the weights
        assert not torch.allclose(decoder_layers(rotated)[0].self_attn.v_proj.weight, decoder_layers(model)[0].self_attn.v_proj.weight)


def test_online_hadamard_spreads_the_down_proj_outliers_before_the_quantizer():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    x = torch.randn(2, 16, 128)
    x[..., 5] *= 50  # one massive channel, like the SwiGLU output of real LLMs
    rotated = copy.deepcopy(model)
    add_online_hadamard(rotated, "mlp.down_proj")
    down = decoder_layers(rotated)[0].mlp.down_proj
    seen = down.transform_input(x)
    ratio = lambda t: float(t.abs().amax() / t.abs().median())  # noqa: E731
    assert ratio(seen) < ratio(x) / 5
    # and the quantized block with the Hadamard has a lower down_proj error than without
    err = {}
    for name, block in (("plain", layer), ("hadamard", decoder_layers(rotated)[0])):
        q = make_quant_block(block, W4, A4).mlp.down_proj
        with torch.no_grad():
            err[name] = float((q(x) - layer.mlp.down_proj(x)).pow(2).mean())
    assert err["hadamard"] < err["plain"]


def test_reassembly_is_appended_after_the_online_hadamard_and_fused_blocks_rebuild_exactly():
    model = tiny_model(layers=1)
    add_online_hadamard(model, "mlp.down_proj")
    layer = decoder_layers(model)[0]
    inter = model.config.intermediate_size
    m = torch.rand(inter) + torch.tensor([9.0] * 2 + [0.0] * (inter - 2))
    r = build_reassembly(m, 3.0, torch.randn(32, inter), [layer.mlp.down_proj.transformed_weight()])
    block = make_quant_block(layer, W4, A4, {"down": r})
    assert [t.kind for t in block.mlp.down_proj.input_transforms] == ["hadamard", "reassembly"]
    assert [t.kind for t in layer.mlp.down_proj.input_transforms] == ["hadamard"]  # the FP block is untouched
    runner = BlockRunner(model, 16, "cpu")
    x = torch.randn(2, 16, 64)
    for ql in quant_linears(block).values():
        ql.fuse()
    rebuilt = build_fused_block(layer, fused_block_tensors(block), A4, W4)
    assert [t.kind for t in rebuilt.mlp.down_proj.input_transforms] == ["hadamard", "reassembly"]
    with torch.no_grad():
        assert torch.equal(runner(rebuilt, x), runner(block, x))


def test_attention_quantizer_is_active_and_off_by_default():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 16, "cpu")
    x = torch.randn(2, 16, 64)
    plain = make_quant_block(layer, W4, QuantSpec(8))
    kv4 = make_quant_block(layer, W4, QuantSpec(8), attn_spec=QuantSpec(4))
    assert not attention_quantized(plain) and attention_quantized(kv4)
    with torch.no_grad():
        out_plain, out_kv4 = runner(plain, x), runner(kv4, x)
        out_fp = runner(layer, x)
    assert not torch.allclose(out_plain, out_kv4)  # the attention inputs really are quantized
    assert float((out_kv4 - out_fp).pow(2).mean()) > float((out_plain - out_fp).pow(2).mean())
    assert layer.self_attn.config._attn_implementation == "sdpa"  # the FP model's attention is left alone
    # the fused block keeps the attention quantizer when rebuilt with it
    for ql in quant_linears(kv4).values():
        ql.fuse()
    rebuilt = build_fused_block(layer, fused_block_tensors(kv4), QuantSpec(8), W4, QuantSpec(4))
    with torch.no_grad():
        assert torch.equal(runner(rebuilt, x), out_kv4)


def test_online_qk_hadamard_lowers_the_attention_quantization_error():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        layer.self_attn.k_proj.weight[:3] *= 30  # outlier channels in K, as real models have
    runner = BlockRunner(model, 32, "cpu")
    x = torch.randn(4, 32, 64)
    rotated = copy.deepcopy(layer)
    rotated.self_attn.qk_hadamard = True
    none = QuantSpec(None)
    with torch.no_grad():
        fp = runner(layer, x)
        err = {
            name: float((runner(make_quant_block(block, none, none, attn_spec=QuantSpec(4)), x) - fp).pow(2).mean())
            for name, block in (("plain", layer), ("hadamard", rotated))
        }
        # in full precision the QK rotation changes nothing
        assert torch.allclose(runner(make_quant_block(rotated, none, none), x), fp, atol=1e-5)
    assert err["hadamard"] < err["plain"]


def _calibration(model, n=8, length=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, length), generator=g)
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def test_gptq_fused_block_has_lower_layer_error_than_rtn_on_real_block_inputs():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 32, "cpu")
    x = _calibration(model)
    block = make_quant_block(layer, W4, QuantSpec(8))
    report = gptq_fuse_block(block, runner, x, "cpu", 4, GPTQConfig())
    assert set(report) == set(quant_linears(block))
    for name, errors in report.items():
        assert errors["gptq_error"] < errors["rtn_error"], name
    rtn = make_quant_block(layer, W4, QuantSpec(8))
    with torch.no_grad():
        target = runner(layer, x)
        gptq_mse = float((runner(block, x) - target).pow(2).mean())
        rtn_mse = float((runner(rtn, x) - target).pow(2).mean())
    assert gptq_mse < rtn_mse


def test_gptq_base_stays_on_its_grid_until_the_correction_moves_it():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 32, "cpu")
    x = _calibration(model)
    block = make_quant_block(layer, W4, A4)
    gptq_base_block(block, runner, x, "cpu", 4, GPTQConfig())
    reference = make_quant_block(layer, W4, A4)
    gptq_fuse_block(reference, runner, x, "cpu", 4, GPTQConfig())
    for name, ql in quant_linears(block).items():
        # With B·A = 0 the base quantizes to exactly GPTQ's weight (its own grid, not a new min-max)...
        assert torch.equal(ql.quantized_weight(), quant_linears(reference)[name].weight), name
        # ...and fusing with a fresh (zero-B) correction keeps it bit for bit, in integer form too.
        ql.add_lora(2)
        ql.fuse()
        assert torch.equal(ql.weight, quant_linears(reference)[name].weight), name
        assert torch.equal(dequantize_weight(**ql.codes), ql.weight)
    # A fresh min-max grid would not reproduce GPTQ's weights in general: that is why the base keeps its grid.
    assert not all(
        torch.equal(quantize_weight(q.weight, W4), q.weight) for q in quant_linears(reference).values()
    )


def test_every_transform_kind_runs_in_the_shipped_modeling_code():
    """Each registered kind gives its run-time buffers (`runtime_buffers`), and the shipped file's function for its
    tag computes what the kind computes (remote_modeling imports nothing of ours, so it keeps its own table)."""
    from qllm_pipeline.export.remote_modeling import RUNTIME_KINDS
    from qllm_pipeline.quantized.reassembly import build_reassembly
    from qllm_pipeline.quantized.transforms import TRANSFORM_KINDS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=gen)
    m = x.abs().flatten(0, 1).amax(0) + torch.tensor([9.0, 8.0] + [0.0] * 22)
    examples = {"hadamard": OnlineHadamard(24),  # 24 = 2 · 12: a Sylvester and a Paley factor
                "reassembly": build_reassembly(m, 4.0, x.flatten(0, 1), [torch.randn(7, 24, generator=gen)])}
    assert set(examples) == set(TRANSFORM_KINDS) == set(RUNTIME_KINDS)
    for kind, transform in examples.items():
        got = RUNTIME_KINDS[kind](x, transform.runtime_buffers())
        torch.testing.assert_close(got, transform.apply_to_activation(x), rtol=1e-5, atol=1e-5)
    assert examples["reassembly"].out_channels == 24 and not examples["reassembly"].is_identity


@pytest.mark.parametrize("head_dim, heads", [(16, 4), (64, 8), (12, 4), (16, 12)])
def test_online_o_after_r2_makes_one_full_hadamard(head_dim, heads):
    """R2 rotates each head by H_hd (I ⊗ H_hd); the o_proj Hadamard then mixes only the heads (H_heads ⊗ I), so the
    product at o_proj's input is the full Hadamard H_heads ⊗ H_hd (every entry ±1/√n). A full-width Hadamard after R2
    would not be: for Sylvester orders its within-head half cancels R2's (H_hd H_hd = I)."""
    from types import SimpleNamespace

    from qllm_pipeline.methods.rotation import o_proj_block

    n = head_dim * heads
    config = SimpleNamespace(head_dim=head_dim, hidden_size=n, num_attention_heads=heads)
    block = o_proj_block(config, value_heads=True)
    assert block == head_dim and o_proj_block(config, value_heads=False) == 1
    r2 = torch.block_diag(*[OnlineHadamard(head_dim).matrix()] * heads)
    product = r2 @ OnlineHadamard(n, block).matrix()
    assert torch.allclose(product.abs(), torch.full_like(product, 1 / math.sqrt(n)), atol=1e-12)
    expected = torch.kron(OnlineHadamard(heads).matrix(), torch.eye(head_dim, dtype=torch.float64))
    assert torch.allclose(OnlineHadamard(n, block).matrix(), expected, atol=1e-12)
    if hadamard_factors(head_dim) == (head_dim, 1) and hadamard_factors(heads) == (heads, 1):  # both Sylvester
        old = r2 @ OnlineHadamard(n).matrix()
        assert torch.allclose(old, torch.kron(OnlineHadamard(heads).matrix(), torch.eye(head_dim, dtype=torch.float64)),
                              atol=1e-12)  # the cancellation this form avoids


def test_online_o_stays_full_width_without_a_hadamard_of_the_head_count():
    from types import SimpleNamespace

    from qllm_pipeline.methods.rotation import o_proj_block

    smollm2 = SimpleNamespace(head_dim=64, hidden_size=576, num_attention_heads=9)  # 9 heads: no Hadamard of order 9
    assert o_proj_block(smollm2, value_heads=True) == 1


def test_block_hadamard_round_trips_and_runs_in_the_shipped_modeling_code():
    from qllm_pipeline.export.remote_modeling import RUNTIME_KINDS
    from qllm_pipeline.quantized.transforms import transforms_from_tensors, transforms_to_tensors

    h = OnlineHadamard(48, block=4)  # 12 blocks of 4: a Paley order across the blocks
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(RUNTIME_KINDS["hadamard"](x, h.runtime_buffers()), h.apply_to_activation(x),
                               rtol=1e-5, atol=1e-5)
    (back,) = transforms_from_tensors(transforms_to_tensors([h]))
    assert (back.size, back.block) == (48, 4)
    torch.testing.assert_close(back.matrix(), h.matrix())
    assert "block" not in OnlineHadamard(48).to_tensors()  # a full-width transform stores what it stored before
    with pytest.raises(ValueError, match="block=5 does not divide"):
        OnlineHadamard(48, block=5)


def test_the_o_proj_form_is_in_what_later_stages_key_on():
    """Blocks built with the cross-head o_proj Hadamard never come from a cache made with the full-width one (the
    rotate stage's content key differs), while a model that keeps the full width keeps its earlier keys."""
    from types import SimpleNamespace

    from qllm_pipeline.stages.rotate import Rotate

    def ctx(heads, value_heads=True, online_o=True):
        config = SimpleNamespace(head_dim=16, hidden_size=16 * heads, num_attention_heads=heads)
        rot = {"value_heads": value_heads, "online_o": online_o}
        return SimpleNamespace(cfg={"rotate": rot}, fp_model=SimpleNamespace(config=config))

    assert Rotate().content_key(ctx(4), None, "k") == "k+o_proj_block16"
    for unchanged in (ctx(9), ctx(4, value_heads=False), ctx(4, online_o=False)):
        assert Rotate().content_key(unchanged, None, "k") == "k"
