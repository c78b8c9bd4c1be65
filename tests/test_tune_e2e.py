"""End-to-end tuning of the fused model's scales and clip ratios (stage tune_e2e): exact at the start, lowers the
KL to the FP model, keeps the codes, and its stored result rebuilds the tuned model exactly; the stage is cached,
evaluated and exported."""
import copy
import math

import pytest
import torch

from conftest import read_results, run_cli, tiny_model, tiny_overrides
from qllm_pipeline.blocks import decoder_layers, quant_linears
from qllm_pipeline.e2e_tuning import E2EConfig, attach_tuning, swapped_layers, tune_model, tuned_tensors
from qllm_pipeline.fused import build_fused_block, fused_block_tensors
from qllm_pipeline.lowrank import ACT_CLIP_MIN
from qllm_pipeline.qblock import make_quant_block
from qllm_pipeline.quantizer import QuantSpec

W4, A4 = QuantSpec(4), QuantSpec(4, clip_ratio=0.9)


def _fused_model(teacher):
    """The teacher with every block quantized W4A4 (round to nearest) and fused, plus each block's fused tensors."""
    student = copy.deepcopy(teacher)
    blocks, tensors = [], []
    for layer in decoder_layers(teacher):
        block = make_quant_block(layer, W4, A4)
        for ql in quant_linears(block).values():
            ql.fuse()
        blocks.append(block)
        tensors.append(fused_block_tensors(block))
    student.model.layers = torch.nn.ModuleList(blocks)
    return student.requires_grad_(False), tensors


def _windows(n=8, seq=32, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _kl(student, teacher, windows):
    with torch.no_grad():
        t = torch.log_softmax(teacher(windows).logits, -1)
        s = torch.log_softmax(student(windows).logits, -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean())


def test_attaching_changes_nothing_until_trained():
    teacher = tiny_model(layers=2).eval().requires_grad_(False)
    student, _ = _fused_model(teacher)
    windows = _windows(2)
    with torch.no_grad():
        before = student(windows).logits
    groups = attach_tuning(list(decoder_layers(student)), E2EConfig(norm_lr=1e-4))
    assert [len(g["params"]) for g in groups] == [14, 14, 4]  # a scale delta and a clip per projection; two norms per block
    with torch.no_grad():
        assert torch.equal(student(windows).logits, before)


def test_tuning_lowers_the_kl_keeps_the_codes_and_rebuilds_exactly():
    teacher = tiny_model(layers=2).eval().requires_grad_(False)
    student, fused = _fused_model(teacher)
    calib, held = _windows(8, seed=0), _windows(8, seed=1)
    codes = [{n: ql.codes["codes"].clone() for n, ql in quant_linears(b).items()} for b in decoder_layers(student)]
    kl_calib, kl_held = _kl(student, teacher, calib), _kl(student, teacher, held)
    stats = tune_model(student, teacher, calib, E2EConfig(epochs=4, scale_lr=2e-3, act_clip_lr=1e-2), "cpu", progress=False)
    assert stats["steps"] == 32 and len(stats["kl_per_epoch"]) == 4
    assert stats["kl_before"] == pytest.approx(kl_calib, rel=1e-5)
    assert stats["kl_after"] == pytest.approx(_kl(student, teacher, calib), rel=1e-5)  # the committed model's KL
    assert _kl(student, teacher, calib) < 0.9 * kl_calib
    assert _kl(student, teacher, held) < kl_held  # not only the windows it saw
    for block, before in zip(decoder_layers(student), codes):
        for name, ql in quant_linears(block).items():
            assert torch.equal(ql.codes["codes"], before[name]), name  # the integer weights are untouched
            assert ql.scale_delta is None and ql.act_clip is None and ql.act_clip_learned
            assert ACT_CLIP_MIN <= ql.act_spec.clip_ratio <= 1.0
    scales = [ql.codes["scale"] for b in decoder_layers(student) for ql in quant_linears(b).values()]
    originals = [fused[i][f"{n}.scale"] for i in range(2) for n in quant_linears(decoder_layers(student)[i])]
    assert any(not torch.equal(a, b) for a, b in zip(scales, originals))
    # What the stage stores (the tuned scales, clips and norms) over the fused tensors rebuilds the tuned model exactly.
    rebuilt = copy.deepcopy(teacher)
    rebuilt.model.layers = torch.nn.ModuleList(
        build_fused_block(layer, {**fused[i], **tuned_tensors(list(decoder_layers(student)))[i]}, A4, W4)
        for i, layer in enumerate(decoder_layers(teacher)))
    with torch.no_grad():
        assert torch.equal(rebuilt(held).logits, student(held).logits)


def test_swapped_layers_restores_the_model():
    model = tiny_model(layers=2)
    original = model.model.layers
    with swapped_layers(model, [original[0]]) as swapped:
        assert len(swapped.model.layers) == 1
    assert model.model.layers is original


@pytest.mark.parametrize("kwargs, message", [
    ({"scale_lr": 0, "act_clip_lr": 0, "norm_lr": 0}, "tune_e2e: scale_lr, act_clip_lr and norm_lr are all 0, so nothing "
     "would be tuned; set one of them or leave the tune_e2e stage out"),
    ({"epochs": 0}, "tune_e2e.epochs=0 must be >= 1 (or leave the tune_e2e stage out)"),
    ({"scale_lr": -1.0}, "tune_e2e.scale_lr=-1.0 must be a number >= 0 (0: not tuned)"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as err:
        E2EConfig(**kwargs)
    assert str(err.value) == message


def test_scale_lr_per_weight_bit_width_keys_by_the_rate_it_resolves_to():
    """A map {weight bits: rate} acts as the rate of the run's weight width: the same cache key as that number, another
    key for another width's rate, and the resolved rate is the one trained with."""
    from stages.tune_e2e import TuneE2E, e2e_config

    settings = {"epochs": 2, "batch_size": 1, "scale_lr": 0.004, "act_clip_lr": 0.005, "norm_lr": 0.0, "seed": 0}
    stage = TuneE2E()

    def cfg(scale_lr, wbits):
        return {"tune_e2e": {**settings, "scale_lr": scale_lr}, "quant": {"wbits": wbits, "abits": 4}}

    by_bits = {4: 0.004, 6: 0.001}
    assert stage.key_config(cfg(by_bits, 4)) == stage.key_config(cfg(0.004, 4))
    assert stage.key_config(cfg(by_bits, 6)) == stage.key_config(cfg(0.001, 6)) != stage.key_config(cfg(by_bits, 4))
    assert e2e_config(cfg(by_bits, 6)).scale_lr == 0.001 and e2e_config(cfg(0.002, 6)).scale_lr == 0.002
    # A width the map does not list takes the nearest listed width's rate (the smaller on a tie); no weight grid, none.
    assert [e2e_config(cfg(by_bits, b)).scale_lr for b in (2, 3, 5, 8)] == [0.004, 0.004, 0.004, 0.001]
    assert e2e_config(cfg(by_bits, None)).scale_lr == 0.0


def test_the_stage_is_cached_evaluated_and_exported(tiny_model_dir, tmp_path):
    """A pipeline run with tune_e2e: its own row, a cache hit on the re-run, the written model holds the tuned
    blocks (it reloads to the same perplexity), and the blocks before it are shared with the run without it."""
    from qllm_pipeline.data import evaluation_windows, load_corpus, tokenize
    from qllm_pipeline.export import load_quantized_model
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    base = [*tiny_overrides(tiny_model_dir, cache, tmp_path / "run"), "method=rotation_lrc_gptq", "fuse.format=qllm-packed",
            "tune_e2e.epochs=1"]
    without = run_cli([*base, "pipeline.stages=[calibrate,rotate,train_lowrank,fuse,evaluate]",
                       f"hydra.run.dir={tmp_path / 'plain'}"])
    assert without.returncode == 0, without.stderr[-3000:]
    first = run_cli([*base, "pipeline.stages=[calibrate,rotate,train_lowrank,fuse,tune_e2e,evaluate]"])
    assert first.returncode == 0, first.stderr[-3000:]
    results = read_results(tmp_path / "run")
    stages = {s["stage"]: s for s in results["stages"]}
    assert stages["tune_e2e"]["computed"] == 1 and stages["train_lowrank"]["computed"] == 0  # blocks shared
    ppl = results["ppl"]["wiki_sample"]
    plain = read_results(tmp_path / "plain")["ppl"]["wiki_sample"]
    assert "rotation+lrc+e2e+gptq" in ppl and ppl["rotation+lrc+e2e+gptq"] != plain["rotation+lrc+gptq"]
    assert ppl["fp"] == plain["fp"]
    again = run_cli(base + ["pipeline.stages=[calibrate,rotate,train_lowrank,fuse,tune_e2e,evaluate]"])
    assert again.returncode == 0, again.stderr[-3000:]
    stages = {s["stage"]: s for s in read_results(tmp_path / "run")["stages"]}
    assert stages["tune_e2e"]["status"] == "cache hit" and stages["evaluate"]["status"] == "cache hit"
    # The written model is the tuned one.
    model = load_quantized_model(tmp_path / "run" / "quantized_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    windows = evaluation_windows(tokenize(tokenizer, load_corpus("wiki_sample", {"name": "wiki_sample"}).eval_text), 32, 8)
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:]).item() for w in windows)
    assert math.exp(nll / len(windows)) == pytest.approx(ppl["rotation+lrc+e2e+gptq"], rel=1e-4)


def test_the_best_recipe_tunes_end_to_end_and_the_default_job_does_not():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from qllm_pipeline.export_ct import runtime_parts as parts_of

    def runtime_parts(cfg):
        return parts_of(OmegaConf.to_container(cfg, resolve=False))

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        recipe = compose("config", overrides=["method=rotation_lrc_gptq"])
        assert list(recipe.pipeline.stages)[-2:] == ["tune_e2e", "evaluate"]
        assert "tune_e2e" not in compose("config").pipeline.stages
        # tuned clip ratios are per projection, so the checkpoint needs its modeling file; scales alone do not
        parts = runtime_parts(compose("config", overrides=["method=rotation_lrc_gptq", "train_lowrank.learn_act_clip=false"]))
        assert "activation clip ratios tuned per projection (tune_e2e.act_clip_lr)" in parts
        parts = runtime_parts(compose("config", overrides=["method=rotation_lrc_gptq", "tune_e2e.act_clip_lr=0"]))
        assert not any("tune_e2e" in p for p in parts)


def test_the_memory_plan_counts_the_whole_model_only_when_tuning():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from qllm_pipeline.plan import model_params, run_plan

    arch = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
            "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        plans = {}
        for extra in ([], ["pipeline.stages=[calibrate,rotate,train_lowrank,fuse,evaluate]"]):
            cfg = OmegaConf.to_container(compose("config", overrides=["method=rotation_lrc_gptq", *extra]), resolve=False)
            plans[bool(extra)] = run_plan(cfg, arch, "cpu")
    tuned, plain = plans[False], plans[True]
    assert "tune_e2e" not in plain["stage_working_sets"]
    # the student and the FP teacher, whole, at least; the tuning's peak is then the run's host peak here
    assert tuned["stage_working_sets"]["tune_e2e"] > 2 * model_params(arch) * 4
    assert tuned["host_peak_bytes"] == tuned["host_per_stage"]["tune_e2e"] > plain["host_peak_bytes"]
