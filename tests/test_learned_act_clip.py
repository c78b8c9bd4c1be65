"""Learned activation clip ratios (train_lowrank.learn_act_clip): exact forward, trained with the correction,
stored with the fused block and carried by every export."""
import pytest
import torch

from conftest import tiny_model
from qllm_pipeline.methods.lowrank import (
    ACT_CLIP_MIN,
    LowRankConfig,
    fuse_block,
    load_lora_state,
    lora_state,
    train_block,
)
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers, quant_linears
from qllm_pipeline.quantized.fused import build_fused_block, fused_block_tensors
from qllm_pipeline.quantized.qblock import make_quant_block
from qllm_pipeline.quantized.quantizer import QuantSpec, quantize_lastdim_learned_clip, quantize_tokens

W4, A4 = QuantSpec(4), QuantSpec(4, clip_ratio=0.85)


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_clip_forward_equals_the_fixed_ratio_and_has_a_gradient(symmetric):
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * 3
    clip = torch.tensor(0.8, requires_grad=True)
    q = quantize_lastdim_learned_clip(x, 4, symmetric, clip)
    assert torch.equal(q, quantize_tokens(x, 4, symmetric, float(clip.detach())))
    (q - x).pow(2).sum().backward()  # the quantization error depends on the clip: a nonzero gradient
    assert torch.isfinite(clip.grad) and clip.grad != 0


def _setup():
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 32, "cpu")
    with torch.no_grad():
        x = model.get_input_embeddings()(torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0)))
        target = runner(layer, x)
    return layer, runner, x, target


def test_learning_the_clip_lowers_the_block_loss_and_stays_in_range():
    layer, runner, x, target = _setup()
    losses, blocks = {}, {}
    for learn in (False, True):
        block = make_quant_block(layer, W4, A4)
        stats = train_block(block, runner, x, target, LowRankConfig(rank=4, lr=2e-3, epochs=2, learn_act_clip=learn), "cpu",
                            progress=False)
        losses[learn], blocks[learn] = stats["loss_after"], block
    assert losses[True] < losses[False]
    clips = [float(ql.act_clip) for ql in quant_linears(blocks[True]).values()]
    assert all(ACT_CLIP_MIN <= c <= 1.0 for c in clips) and any(c != pytest.approx(0.85, abs=1e-4) for c in clips)
    assert all(ql.act_clip is None for ql in quant_linears(blocks[False]).values())
    # one ratio per input point: q/k/v share theirs, gate/up theirs (a deployment quantizes each input once)
    learned = quant_linears(blocks[True])
    assert learned["self_attn.q_proj"].act_clip is learned["self_attn.k_proj"].act_clip is learned["self_attn.v_proj"].act_clip
    assert learned["mlp.gate_proj"].act_clip is learned["mlp.up_proj"].act_clip
    assert learned["mlp.gate_proj"].act_clip is not learned["mlp.down_proj"].act_clip
    # per projection: seven ratios of their own
    block = make_quant_block(layer, W4, A4)
    train_block(block, runner, x, target, LowRankConfig(rank=4, lr=2e-3, epochs=1, learn_act_clip=True, act_clip_shared=False),
                "cpu", progress=False)
    assert len({id(ql.act_clip) for ql in quant_linears(block).values()}) == 7


def test_learned_clips_survive_saving_fusing_and_rebuilding():
    layer, runner, x, target = _setup()
    block = make_quant_block(layer, W4, A4)
    train_block(block, runner, x, target, LowRankConfig(rank=4, lr=2e-3, epochs=1, learn_act_clip=True), "cpu", progress=False)
    state = lora_state(block)
    assert {k for k in state if k.endswith(".act_clip")} == {f"{n}.act_clip" for n in quant_linears(block)}
    reloaded = make_quant_block(layer, W4, A4)
    load_lora_state(reloaded, state)
    with torch.no_grad():
        trained_out = runner(block, x)
        assert torch.equal(runner(reloaded, x), trained_out)
    fuse_block(reloaded)
    tensors = fused_block_tensors(reloaded)
    for name, ql in quant_linears(reloaded).items():
        assert ql.act_clip is None and ql.act_spec.clip_ratio == float(tensors[f"{name}.act_clip"])
    rebuilt = build_fused_block(layer, tensors, A4, W4)
    with torch.no_grad():
        assert torch.equal(runner(rebuilt, x), runner(reloaded, x))
        # without the stored ratios the block would use the global one: a different output
        plain = build_fused_block(layer, {k: v for k, v in tensors.items() if not k.endswith(".act_clip")}, A4, W4)
        assert not torch.equal(runner(plain, x), runner(rebuilt, x))


def test_lrc_key_leaves_out_the_default():
    from qllm_pipeline.stages.train_lowrank import TrainLowrank

    lrc = {"enabled": True, "rank": 4, "lr": 2e-3, "epochs": 2, "batch_size": 1, "weight_decay": 0.0, "train_norms": True,
           "autocast": "auto", "seed": 0, "act_clip_lr": None, "act_clip_shared": True}
    base = {"quant": {"wbits": 4, "abits": 4, "weight_algorithm": "rtn"}}
    off = {**base, "train_lowrank": {**lrc, "learn_act_clip": False}}
    on = {**base, "train_lowrank": {**lrc, "learn_act_clip": True}}
    clip_keys = {"learn_act_clip", "act_clip_lr", "act_clip_shared"}
    # off: the key part of the runs made before the setting existed (their artifacts stay valid); on: a key of its own
    assert not clip_keys & set(TrainLowrank().key_config(off)["train_lowrank"])
    assert clip_keys <= set(TrainLowrank().key_config(on)["train_lowrank"])
    assert TrainLowrank().key_config(on) != TrainLowrank().key_config(off)
    with pytest.raises(ValueError, match="learn_act_clip='yes' must be true or false"):
        LowRankConfig(learn_act_clip="yes")


def test_packed_export_keeps_the_learned_clips(tmp_path):
    from qllm_pipeline.export.packed import load_quantized_model, save_quantized_model

    layer, runner, x, target = _setup()
    model = tiny_model(layers=1)  # the same weights as _setup's (same seed)
    block = make_quant_block(layer, W4, A4)
    train_block(block, runner, x, target, LowRankConfig(rank=4, lr=2e-3, epochs=1, learn_act_clip=True), "cpu", progress=False)
    fuse_block(block)
    save_quantized_model(model, None, [fused_block_tensors(block)], {"wbits": 4, "abits": 4, "a_clip_ratio": 0.85},
                         tmp_path / "q")
    loaded = load_quantized_model(tmp_path / "q")
    for name, ql in quant_linears(decoder_layers(loaded)[0]).items():
        assert ql.act_spec.clip_ratio == quant_linears(block)[name].act_spec.clip_ratio != 0.85, name
    with torch.no_grad():
        assert torch.equal(runner(decoder_layers(loaded)[0], x), runner(block, x))


def test_a_recipe_sets_keys_of_groups_listed_after_it():
    """conf/config.yaml lists `method` after the groups a recipe sets, so rotation_lrc_gptq's train_lowrank values are
    not overwritten by train_lowrank/default.yaml (they once were), and the command line still wins."""
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        recipe = compose("config", overrides=["method=rotation_lrc_gptq"])
        assert recipe.train_lowrank.learn_act_clip is True and recipe.train_lowrank.act_clip_shared is False
        assert recipe.quant.weight_algorithm == "gptq"
        assert compose("config", overrides=["method=rotation_lrc_gptq", "train_lowrank.learn_act_clip=false"]
                       ).train_lowrank.learn_act_clip is False
        assert compose("config").train_lowrank.learn_act_clip is False  # the default job is unchanged
