"""Low-rank error correction (qllm_pipeline.methods.lowrank) on a tiny random LLaMA block."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qllm_pipeline.model.arch import LLAMA
from qllm_pipeline.quantized.blocks import BlockRunner, quant_linears, quantize_block_linears

LINEAR_NAMES = LLAMA.linears
from qllm_pipeline.core.lrc_memory import format_plan, memory_plan
from qllm_pipeline.methods.lowrank import (
    LowRankConfig,
    attach_lora,
    fuse_block,
    load_lora_state,
    lora_state,
    resolve_autocast,
    train_block,
    trainable_parameters,
)
from qllm_pipeline.quantized.quantizer import QuantSpec, quantize_weight

N, L = 8, 16
W4, A4 = QuantSpec(4), QuantSpec(4)
CFG = LowRankConfig(lr=5e-4, epochs=10, seed=0)  # the reference's rate and epochs


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().item()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    runner = BlockRunner(model, L, "cpu")
    fp_block = model.model.layers[0]
    x = torch.randn(N, L, config.hidden_size)
    target = runner.run_batched(fp_block, x, N)
    qblock = copy.deepcopy(fp_block)
    quantize_block_linears(qblock, W4, A4)
    qblock.requires_grad_(False)
    return {"config": config, "model": model, "runner": runner, "fp_block": fp_block, "x": x, "target": target, "qblock": qblock}


@pytest.fixture(scope="module")
def trained(setup):
    block = copy.deepcopy(setup["qblock"])
    result = train_block(block, setup["runner"], setup["x"], setup["target"], CFG, "cpu", progress=False)
    return block, result


def run(setup, block):
    return setup["runner"].run_batched(block, setup["x"], N)


def test_zero_init_leaves_output_unchanged(setup):
    block = copy.deepcopy(setup["qblock"])
    before = run(setup, block)
    attach_lora(block, rank=4, seed=0)
    for name, ql in quant_linears(block).items():
        assert ql.lora_A.shape == (4, ql.in_features), name
        assert ql.lora_B.shape == (ql.out_features, 4), name
        assert torch.count_nonzero(ql.lora_B) == 0
        assert torch.count_nonzero(ql.lora_A) == ql.lora_A.numel()
    after = run(setup, block)
    assert torch.equal(before, after)
    # The quantized block really differs from the FP block (otherwise there is nothing to correct).
    assert mse(after, setup["target"]) > 0


def test_attach_lora_is_deterministic(setup):
    a, b, c = (copy.deepcopy(setup["qblock"]) for _ in range(3))
    attach_lora(a, 4, seed=1)
    attach_lora(b, 4, seed=1)
    attach_lora(c, 4, seed=2)
    for name in LINEAR_NAMES:
        qa, qb, qc = (quant_linears(m)[name] for m in (a, b, c))
        assert torch.equal(qa.lora_A, qb.lora_A)
        assert not torch.equal(qa.lora_A, qc.lora_A)


def test_trainable_parameters(setup):
    block = copy.deepcopy(setup["qblock"])
    with pytest.raises(ValueError):
        trainable_parameters(block, train_norms=False)  # no LoRA yet
    attach_lora(block, 4, 0)
    lora_only = trainable_parameters(block, train_norms=False)
    with_norms = trainable_parameters(block, train_norms=True)
    assert len(lora_only) == 2 * len(LINEAR_NAMES)
    assert len(with_norms) == len(lora_only) + 2
    assert {id(p) for p in with_norms[-2:]} == {id(block.input_layernorm.weight), id(block.post_attention_layernorm.weight)}


def test_training_reduces_error(setup, trained):
    block, result = trained
    baseline = mse(run(setup, setup["qblock"]), setup["target"])
    assert result["loss_before"] == pytest.approx(baseline, rel=1e-6)
    assert result["loss_after"] < result["loss_before"]
    assert len(result["epoch_losses"]) == CFG.epochs
    assert all(torch.isfinite(torch.tensor(result["epoch_losses"])))
    # Recompute the error independently of train_block.
    after = mse(run(setup, block), setup["target"])
    assert after == pytest.approx(result["loss_after"], rel=1e-6)
    assert after < baseline
    # Training changed B (and the norms), and left nothing trainable.
    assert all(torch.count_nonzero(ql.lora_B) > 0 for ql in quant_linears(block).values())
    assert not torch.equal(block.input_layernorm.weight, setup["qblock"].input_layernorm.weight)
    assert not any(p.requires_grad for p in block.parameters())
    assert all(p.grad is None for p in block.parameters())


def test_train_norms_false_keeps_norms(setup):
    block = copy.deepcopy(setup["qblock"])
    cfg = LowRankConfig(lr=5e-4, epochs=2, batch_size=3, train_norms=False)  # 8 samples: batches of 3, 3, 2
    result = train_block(block, setup["runner"], setup["x"], setup["target"], cfg, "cpu", progress=False)
    assert len(result["epoch_losses"]) == 2
    assert result["loss_after"] < result["loss_before"]
    for name in ("input_layernorm", "post_attention_layernorm"):
        assert torch.equal(getattr(block, name).weight, getattr(setup["qblock"], name).weight)
    state = lora_state(block)
    assert not any(key.endswith("layernorm.weight") for key in state)


def test_fuse_matches_trained_block(setup, trained):
    block, _ = trained
    out_trained = run(setup, block)
    expected = {}
    for name, ql in quant_linears(block).items():
        with torch.no_grad():
            q_trained = ql.quantized_weight().detach().clone()
            merged = ql.weight + ql.lora_B @ ql.lora_A  # merge, then quantize, computed here
            expected[name] = quantize_weight(merged, ql.weight_spec)
        torch.testing.assert_close(q_trained, expected[name], rtol=0, atol=1e-6)
    fused = copy.deepcopy(block)
    fuse_block(fused)
    for name, ql in quant_linears(fused).items():
        assert ql.lora_A is None and ql.lora_B is None and ql.weight_is_quantized
        torch.testing.assert_close(ql.weight, expected[name], rtol=0, atol=1e-6)
        # the fused weight sits on a 4-bit grid: at most 16 distinct values per row
        assert max(len(torch.unique(row)) for row in ql.weight) <= 2**W4.bits
    out_fused = run(setup, fused)
    torch.testing.assert_close(out_fused, out_trained, rtol=1e-5, atol=1e-6)
    # Fusing does not undo the correction.
    assert mse(out_fused, setup["target"]) < mse(run(setup, setup["qblock"]), setup["target"])


def test_state_round_trip(setup, trained):
    block, _ = trained
    state = lora_state(block)
    expected_keys = {f"{n}.lora_{p}" for n in LINEAR_NAMES for p in "AB"} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert set(state) == expected_keys
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    fresh = copy.deepcopy(setup["qblock"])  # no LoRA attached, untrained norms
    load_lora_state(fresh, state)
    assert torch.equal(run(setup, fresh), run(setup, block))
    other = copy.deepcopy(setup["qblock"])
    attach_lora(other, 4, seed=123)  # an existing correction is overwritten
    load_lora_state(other, state)
    assert torch.equal(run(setup, other), run(setup, block))
    assert lora_state(other).keys() == state.keys()
    with pytest.raises(ValueError):
        load_lora_state(copy.deepcopy(setup["qblock"]), {**state, "mlp.bogus.lora_A": state["mlp.up_proj.lora_A"]})
    missing = {k: v for k, v in state.items() if not k.startswith("mlp.down_proj")}
    with pytest.raises(ValueError):
        load_lora_state(copy.deepcopy(setup["qblock"]), missing)


def test_same_seed_same_result(setup):
    runs = []
    for seed in (0, 0, 1):
        block = copy.deepcopy(setup["qblock"])
        result = train_block(block, setup["runner"], setup["x"], setup["target"], LowRankConfig(lr=5e-4, epochs=3, seed=seed), "cpu", progress=False)
        runs.append((result, lora_state(block)))
    (r0, s0), (r1, s1), (r2, s2) = runs
    assert r0 == r1
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert r0["epoch_losses"] != r2["epoch_losses"]  # the seed matters (A's init and the shuffling)


def test_half_precision_block_keeps_dtype(setup):
    block = copy.deepcopy(setup["fp_block"]).half()
    quantize_block_linears(block, W4, A4)
    block.requires_grad_(False)
    runner = BlockRunner(setup["model"], L, "cpu", torch.float16)
    result = train_block(block, runner, setup["x"].half(), setup["target"].half(), LowRankConfig(lr=5e-4, epochs=3), "cpu", progress=False)
    assert result["loss_after"] < result["loss_before"]
    assert {p.dtype for p in block.parameters()} == {torch.float16}
    assert {t.dtype for t in lora_state(block).values()} == {torch.float16}


def test_resolve_autocast():
    cpu = torch.device("cpu")
    assert resolve_autocast("auto", cpu) is None
    assert resolve_autocast("none", cpu) is None
    assert resolve_autocast("bf16", cpu) is torch.bfloat16
    assert resolve_autocast("fp16", cpu) is torch.float16
    with pytest.raises(ValueError):
        LowRankConfig(autocast="fp8")


def test_memory_plan_counts_match_a_real_block(setup, trained):
    config = setup["config"]
    plan = memory_plan(
        config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
        n_samples=N, seq_len=L, rank=CFG.rank, weight_bytes=4, act_bytes=4,
    )
    fp_params = sum(p.numel() for p in setup["fp_block"].parameters())
    assert plan["block_params"] == fp_params
    assert plan["block_weight_bytes"] == fp_params * 4
    block, _ = trained
    assert plan["trainable_params"] == sum(p.numel() for p in trainable_parameters(block, train_norms=True))
    assert plan["cached_inputs_bytes"] == setup["x"].numel() * setup["x"].element_size()


def test_memory_plan_llama2_70b():
    kwargs = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, n_samples=128, rank=4)
    plan = memory_plan(seq_len=2048, weight_bytes=2, act_bytes=2, **kwargs)
    gib = 1024**3
    assert plan["device_peak_bytes"] < 80 * gib
    # inputs/targets live on CPU: 128 × 2048 × 8192 × 2 B = 4 GiB each, not part of the device peak
    assert plan["cached_inputs_bytes"] == plan["cached_targets_bytes"] == 128 * 2048 * 8192 * 2
    assert plan["device_peak_with_cache_bytes"] == plan["device_peak_bytes"] + 2 * plan["cached_inputs_bytes"]
    assert plan["device_peak_bytes"] > plan["block_weight_bytes"] + plan["lora_optimizer_bytes"] + plan["activation_bytes"]
    assert plan["attention_scores_bytes"] >= 64 * 2048 * 2048 * 2
    longer = memory_plan(seq_len=4096, weight_bytes=2, act_bytes=2, **kwargs)
    assert longer["device_peak_bytes"] > plan["device_peak_bytes"]
    assert longer["activation_bytes"] > 2 * plan["activation_bytes"]  # attention scores grow quadratically
    bigger_batch = memory_plan(seq_len=2048, weight_bytes=2, act_bytes=2, batch_size=4, **kwargs)
    assert bigger_batch["device_peak_bytes"] > plan["device_peak_bytes"]
    text = format_plan(plan)
    assert "GiB" in text and "device peak" in text
