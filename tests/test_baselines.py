"""The SmoothQuant and rotation baselines as pipeline stages: exact in FP, composable with CRA+LRC, cached, exported."""
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import read_results, run_cli, tiny_model, tiny_overrides
from qllm_pipeline.core.cache import ArtifactCache
from qllm_pipeline.core.report import cpu_model
from qllm_pipeline.methods.reassembly_inputs import channel_max as search_channel_max
from qllm_pipeline.model.arch import LLAMA
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
from qllm_pipeline.stages.collect_activations import channel_max as collect_channel_max
from qllm_pipeline.stages.rotate import Rotate
from qllm_pipeline.stages.smooth import Smooth


def stage_rows(results):
    return {row["stage"]: row for row in results["stages"]}


def _artifact(tmp_path, name, produce):
    cache = ArtifactCache(tmp_path / "cache")
    with cache.writer(name, "k") as writer:
        produce(writer)
    return cache.get(name, "k")


def test_rotate_stage_swaps_in_an_equivalent_rotated_model(tmp_path):
    model = tiny_model(layers=2)
    parts = {"residual": True, "value_heads": True, "online_down": True, "online_o": True, "online_qk": True,
             "online_inputs": True}
    ctx = SimpleNamespace(fp_model=model, model=model, cfg={"rotate": {"seed": 3, **parts}})
    rotate = Rotate()
    artifact = _artifact(tmp_path, "rotate", lambda w: rotate.run(ctx, w))
    rotate.apply(ctx, artifact)
    assert ctx.model is not model and ctx.fp_model is model
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ctx.model(ids).logits, model(ids).logits, atol=1e-4)
        # the stream the blocks see really is rotated: the outlier embedding channels are spread out
        e_fp, e_rot = model.get_input_embeddings()(ids), ctx.model.get_input_embeddings()(ids)
        h_fp = decoder_layers(model)[0].input_layernorm(e_fp)
        h_rot = decoder_layers(ctx.model)[0].input_layernorm(e_rot)
    assert not torch.allclose(e_fp, e_rot)
    kurtosis = lambda x: float(((x - x.mean()) ** 4).mean() / x.var() ** 2)  # noqa: E731
    assert kurtosis(h_rot) < kurtosis(h_fp)


def test_smooth_stage_is_exact_and_rescales_the_searched_maxima(tmp_path):
    model = tiny_model(layers=1)
    layer = decoder_layers(model)[0]
    runner = BlockRunner(model, 16, "cpu")
    x = torch.randn(3, 16, 64)
    stats = collect_channel_max(layer, runner, x, "cpu", 2)
    collected = _artifact(tmp_path, "collect", lambda w: w.save_tensors("channel_max.safetensors", stats))
    ctx = SimpleNamespace(cfg={"smooth": {"alpha": 0.5}})
    state = SimpleNamespace(fp_block=layer, artifacts={"collect_activations": collected})
    smooth = Smooth()
    scales = _artifact(tmp_path, "smooth", lambda w: smooth.run(ctx, state, w))
    smooth.apply(ctx, state, scales)
    assert state.fp_block is not layer  # the model's own block is left alone
    with torch.no_grad():
        assert torch.allclose(runner(state.fp_block, x), runner(layer, x), atol=1e-5)
    # search-theta's channel maxima are those of the smoothed block's real inputs
    measured = collect_channel_max(state.fp_block, runner, x, "cpu", 2)
    derived = search_channel_max({"collect_activations": collected, "smooth": scales}, LLAMA)
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.allclose(derived[name], measured[name], rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(derived["self_attn.q_proj"], stats["self_attn.q_proj"])


def test_smoothquant_and_rotation_qllm_run_cache_and_export(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    sq = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "sq"), "method=smoothquant"])
    assert sq.returncode == 0, sq.stderr[-3000:]
    r_sq = read_results(tmp_path / "sq")
    assert set(r_sq["ppl"]["wiki_sample"]) == {"fp", "rtn", "smoothquant"}
    assert stage_rows(r_sq)["smooth"]["computed"] == 3
    assert r_sq["ppl"]["wiki_sample"]["smoothquant"] != r_sq["ppl"]["wiki_sample"]["rtn"]

    again = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "sq2"), "method=smoothquant"])
    assert again.returncode == 0, again.stderr[-3000:]
    r2 = read_results(tmp_path / "sq2")
    assert stage_rows(r2)["smooth"]["cached"] == 3 and stage_rows(r2)["smooth"]["computed"] == 0
    assert r2["ppl"] == r_sq["ppl"]

    # SmoothQuant composes with CRA+LRC; block 0's statistics and scales are the SmoothQuant run's (same chain key)
    stages = "pipeline.stages=[calibrate,collect_activations,smooth,search_theta,reassemble,train_lowrank,fuse,evaluate]"
    combo = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "sq_qllm"), stages])
    assert combo.returncode == 0, combo.stderr[-3000:]
    r_combo = read_results(tmp_path / "sq_qllm")
    assert set(r_combo["ppl"]["wiki_sample"]) == {"fp", "rtn", "smoothquant+cra+lrc"}
    rows = stage_rows(r_combo)
    assert rows["smooth"]["cached"] == 1 and rows["smooth"]["computed"] == 2 and rows["search_theta"]["computed"] == 3

    rot = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "rot"), "method=rotation_qllm", "fuse.format=qllm-packed"])
    assert rot.returncode == 0, rot.stderr[-3000:]
    r_rot = read_results(tmp_path / "rot")
    row = r_rot["ppl"]["wiki_sample"]
    assert set(row) == {"fp", "rtn", "rotation+cra+lrc"}
    assert row["fp"] == r_sq["ppl"]["wiki_sample"]["fp"] and row["rtn"] == r_sq["ppl"]["wiki_sample"]["rtn"]  # shared rows
    rows = stage_rows(r_rot)
    assert rows["rotate"]["computed"] == 1 and rows["train_lowrank"]["computed"] == 3 and rows["search_theta"]["computed"] == 3
    assert r_rot["meta"]["keys"]["rotate"]
    # what quantized numbers depend on beyond the code: the CPU's kernels, the CPU, the thread count
    assert r_rot["meta"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert r_rot["meta"]["cpu_model"] == cpu_model() and r_rot["meta"]["threads"] >= 1
    assert f"on {cpu_model()}, {r_rot['meta']['threads']} threads" in (tmp_path / "rot" / "results.md").read_text()

    # The exported model carries the rotated embeddings and untied head: its HF forward gives the pipeline's number.
    from qllm_pipeline.data.corpora import corpus_windows, load_corpus
    from qllm_pipeline.export.packed import load_quantized_model
    from qllm_pipeline.model.model_loading import ModelSource, load_tokenizer

    loaded = load_quantized_model(tmp_path / "rot" / "quantized_model")
    tokenizer = load_tokenizer(ModelSource(name="tiny", path=str(tiny_model_dir)))
    corpus = load_corpus("wiki_sample", {"name": "wiki_sample"})
    windows = corpus_windows(tokenizer, corpus, 32, 8)
    with torch.no_grad():
        ppl = math.exp(loaded(windows, labels=windows).loss.item())
    assert ppl == pytest.approx(row["rotation+cra+lrc"], rel=1e-4)


@pytest.mark.parametrize("override, message", [("smooth.alpha=2", "smooth.alpha=2"), ("rotate.seed=x", "rotate.seed='x'")])
def test_bad_baseline_settings_fail_with_one_line(tiny_model_dir, tmp_path, override, message):
    method = "method=smoothquant" if override.startswith("smooth") else "method=rotation"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "c", tmp_path / "r"), method, override])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
