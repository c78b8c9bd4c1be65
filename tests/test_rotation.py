"""QuaRot-style rotation: orthogonal (randomized) Hadamard matrices, exactness of norm fusion and rotation, and the
flatter activations / lower W4A4 error it buys on a model with planted outlier channels."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_config
from qllm_pipeline.methods.rotation import fuse_norms_into_linears, hadamard_matrix, random_hadamard, rotate_model
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec

VOCAB, SEQ = 100, 32
RESIDUAL_OUTLIERS = [10, 11, 12]


def outlier_model(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    """Tiny random LLaMA with planted outliers, in the way real LLMs have them (large activations meet small weights):

    * input_layernorm weights ×20 on channels 0..2, with the q/k/v columns of those channels /20;
    * residual-stream outliers: embedding columns 10..12 ×20, and the columns of every reading linear /20.
    """
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=VOCAB)
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, RESIDUAL_OUTLIERS] *= 20.0
        for layer in decoder_layers(model):
            layer.input_layernorm.weight[:3] *= 20.0
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                linear.weight[:, :3] /= 20.0
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                linear.weight[:, RESIDUAL_OUTLIERS] /= 20.0
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def token_ids(seed: int = 0, batch: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert float((a - b).abs().max()) < 1e-5 * float(b.abs().max())


def final_hidden(model, ids, spec: QuantSpec | None) -> torch.Tensor:
    """Run the decoder layers one by one with BlockRunner, each replaced by a quantized copy when `spec` is given."""
    runner = BlockRunner(model, ids.shape[1], "cpu")
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        for layer in decoder_layers(model):
            hidden = runner(make_quant_block(layer, spec, spec) if spec else layer, hidden)
    return hidden


def quant_error(model, ids, spec: QuantSpec) -> float:
    """Error of the quantized final hidden states, relative to what the decoder layers add to the embeddings.

    Invariant under a rotation of the residual stream, so rotated and plain models are compared fairly.
    """
    with torch.no_grad():
        h0 = model.model.embed_tokens(ids)
    fp, q = final_hidden(model, ids, None), final_hidden(model, ids, spec)
    return float((q - fp).norm() / (fp - h0).norm())


def q_proj_input_flatness(model, ids) -> list[float]:
    """max / median of the per-channel max |x| of every layer's q_proj input (forward pre-hooks)."""
    maxima = []
    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(
            lambda module, args: maxima.append(args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0))
        )
        for layer in decoder_layers(model)
    ]
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return [float(m.max() / m.median()) for m in maxima]


# ----------------------------------------------------------------------------------------------------------------------
# Hadamard matrices


@pytest.mark.parametrize("n", [64, 576, 96, 100, 97])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    assert float((q @ q.T - eye).abs().max()) < 1e-10
    assert float((q.T @ q - eye).abs().max()) < 1e-10
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.allclose(q, random_hadamard(n, seed=4))
    assert random_hadamard(n, seed=3, dtype=torch.float32).dtype == torch.float32
    if hadamard_matrix(n) is not None:  # a true (randomized) Hadamard matrix: every entry is ±1/√n
        torch.testing.assert_close(q.abs(), torch.full_like(q, 1 / math.sqrt(n)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 44, 60, 64, 72, 96, 108, 576, 768])
def test_hadamard_matrix_constructions(n):
    h = hadamard_matrix(n)
    assert h is not None
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_matrix_uses_sylvester_for_powers_of_two_and_reports_missing_orders():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(hadamard_matrix(8), torch.kron(h2, torch.kron(h2, h2)))
    for n in (3, 9, 52, 100):  # odd orders have none; 52 and 100 are not covered by the prime Paley constructions
        assert hadamard_matrix(n) is None


# ----------------------------------------------------------------------------------------------------------------------
# Folding into the model


@pytest.mark.parametrize("tied", [False, True])
def test_fuse_norms_keeps_logits_and_unties(tied):
    model = outlier_model(tied=tied)
    ids = token_ids(batch=4)
    ref = logits(model, ids)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    fuse_norms_into_linears(model)
    assert_same_logits(logits(model, ids), ref)
    norms = [model.model.norm] + [n for layer in decoder_layers(model) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # folding the final norm left embeddings alone
    assert not model.config.tie_word_embeddings


@pytest.mark.parametrize("tied", [False, True])
def test_rotate_model_keeps_logits(tied, tmp_path):
    model = outlier_model(tied=tied)
    ids = token_ids(batch=4)
    ref = logits(model, ids)
    fused = copy.deepcopy(model)
    fuse_norms_into_linears(fused)
    q = rotate_model(model, seed=7)
    torch.testing.assert_close(q, random_hadamard(64, 7))
    # the weights did change, as prescribed
    torch.testing.assert_close(model.model.embed_tokens.weight, (fused.model.embed_tokens.weight.double() @ q).float())
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, (q.T @ fused.model.layers[0].mlp.down_proj.weight.double()).float())
    assert_same_logits(logits(model, ids), ref)
    # a saved rotated model reloads (untied) with the same logits
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits(logits(reloaded, ids), ref)


def test_rotation_without_norm_fusion_would_not_be_exact():
    """The reason norms are fused first: rotating a model whose norm weights are not ones changes its logits."""
    model = outlier_model()
    ids = token_ids(batch=4)
    ref = logits(model, ids)
    q = random_hadamard(64, 0).float()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ q)
        for layer in decoder_layers(model):
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight.copy_(linear.weight @ q)
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.copy_(q.T @ linear.weight)
        model.lm_head.weight.copy_(model.lm_head.weight @ q)
    assert float((logits(model, ids) - ref).abs().max()) > 1e-2 * float(ref.abs().max())


# ----------------------------------------------------------------------------------------------------------------------
# What rotation buys


@pytest.fixture(scope="module")
def three_models():
    plain = outlier_model()
    fused = copy.deepcopy(plain)
    fuse_norms_into_linears(fused)
    rotated = copy.deepcopy(plain)
    rotate_model(rotated, seed=0)
    return plain, fused, rotated


def test_rotation_flattens_q_proj_inputs(three_models):
    ids = token_ids()
    plain, fused, rotated = (q_proj_input_flatness(m, ids) for m in three_models)
    print(f"q_proj input max/median: plain {plain}, norms fused {fused}, rotated {rotated}")
    for p, f, r in zip(plain, fused, rotated):
        assert f < p  # fusing removes the norm-weight outliers, the residual-stream ones stay
        assert r < f / 2 and r < p / 5


def test_rotation_lowers_w4a4_error(three_models):
    ids = token_ids()
    spec = QuantSpec(4)
    plain, fused, rotated = (quant_error(m, ids, spec) for m in three_models)
    print(f"W4A4 RTN error: plain {plain:.4f}, norms fused {fused:.4f}, rotated {rotated:.4f}")
    assert rotated < 0.7 * plain
    assert rotated < fused
