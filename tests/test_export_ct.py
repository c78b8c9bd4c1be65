"""fuse.format=compressed-tensors: every method writes a checkpoint that transformers (with the compressed-tensors
package) reloads in a fresh process to the pipeline's perplexity: stock for the methods whose transforms fold into the
weights, with the shipped modeling_qllm.py (trust_remote_code=True) for those with run-time parts."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, read_results, run_cli, tiny_overrides

OFFLINE_ROTATION = ["rotate.online_down=false", "rotate.online_o=false", "rotate.online_qk=false", "quant.a_clip_ratio=1.0",
                    "train_lowrank.learn_act_clip=false", "tune_e2e.act_clip_lr=0"]
METHODS = {  # method -> overrides that keep it stock-loadable
    "rtn": [],
    "gptq": [],
    "smoothquant": [],
    "lrc": [],
    "rotation": OFFLINE_ROTATION,
    "rotation_lrc_gptq": OFFLINE_ROTATION,
}
VARIANT = {"rtn": "rtn", "gptq": "gptq", "smoothquant": "smoothquant", "lrc": "lrc", "rotation": "rotation",
           "rotation_lrc_gptq": "rotation+lrc+e2e+gptq"}
# method -> overrides, for methods with run-time parts (reassembly, online Hadamards, the A4 clip, attention inputs)
REMOTE = {
    "cra": ("cra", []),
    "qllm": ("cra+lrc", []),
    "qllm_disassembly_only": ("cra+lrc", ["method=qllm", "reassemble.assemble=false", "search_theta.channel_ratio=0.2"]),
    "quarot": ("rotation+gptq", []),
    "quarot_attn4": ("rotation+gptq", ["method=quarot", "quant.attn_bits=4"]),
    "rotation_qllm_gptq": ("rotation+cra+lrc+gptq", []),
    "learned_act_clip": ("rotation+lrc+e2e+gptq", ["method=rotation_lrc_gptq", "train_lowrank.learn_act_clip=true"]),
}


@pytest.fixture(scope="module")
def eval_windows(tiny_model_dir, tmp_path_factory):
    """The evaluation windows of the tiny runs (wiki_sample, 8 × 32), built with the pipeline's own data functions."""
    from transformers import AutoTokenizer

    from qllm_pipeline.data.corpora import corpus_windows, load_corpus

    path = tmp_path_factory.mktemp("ct") / "windows.pt"
    torch.save(corpus_windows(AutoTokenizer.from_pretrained(tiny_model_dir), load_corpus("wiki_sample"), 32, 8), path)
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_reloads_with_stock_transformers(method, tiny_model_dir, tmp_path, eval_windows):
    run = tmp_path / "run"
    args = [*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), f"method={method}", "fuse.format=compressed-tensors",
            *METHODS[method]]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(run)["ppl"]["wiki_sample"]
    variant = next(v for v in rows if v not in ("fp", "rtn")) if method != "rtn" else "rtn"
    assert variant == VARIANT[method]
    model_dir = run / "quantized_model"
    config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    for group in config["config_groups"].values():  # asymmetric W4: each row one block, so zero points stay unpacked
        assert group["input_activations"]["strategy"] == "token" and group["weights"]["strategy"] == "block"
        assert group["weights"]["block_structure"][0] == 1
    assert not (model_dir / "qllm_quant.json").exists()
    # results.json gives the checkpoint's size on disk (its weight files) beside the FP16 size
    checkpoint = read_results(run)["checkpoint"]
    assert checkpoint["checkpoint_bytes"] == sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    assert checkpoint["format"] == "compressed-tensors" and checkpoint["fp16_bytes"] > 0
    assert f"{checkpoint['checkpoint_bytes'] / checkpoint['fp16_bytes']:.2f}× the same model in FP16" in (run / "results.md").read_text()

    assert not (model_dir / "modeling_qllm.py").exists()
    reloaded = reload(model_dir, eval_windows, tmp_path)
    assert reloaded["input_quantized"] == reloaded["linear_count"] == 3 * 7  # activations quantized in every projection
    # The issue asks for 0.1 %; the reload is in fact exact up to float summation order (measured ≤ 1e-6).
    assert reloaded["ppl"] == pytest.approx(rows[variant], rel=1e-5)
    assert abs(reloaded["ppl"] / rows["fp"] - 1) > 1e-4  # and it is not the FP model


def reload(model_dir, windows, cwd) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(cwd / "hf")}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "ct_reload.py"), str(model_dir), str(windows)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(REMOTE))
def test_checkpoint_with_runtime_parts_reloads_with_its_modeling_code(case, tiny_model_dir, tmp_path, eval_windows):
    variant, extra = REMOTE[case]
    run = tmp_path / "run"
    method = [] if extra and extra[0].startswith("method=") else [f"method={case}"]
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), *method, "fuse.format=compressed-tensors", *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ships modeling_qllm.py" in proc.stdout + proc.stderr
    rows = read_results(run)["ppl"]["wiki_sample"]
    model_dir = run / "quantized_model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qllm.QLLMLlamaForCausalLM"
    assert config["quantization_config"]["config_groups"]["group_0"]["input_activations"] is None  # ours, in the file
    # the shipped file imports nothing of ours
    assert "qllm_pipeline" not in "".join(
        line for line in (model_dir / "modeling_qllm.py").read_text().splitlines() if line.startswith(("import", "from")))
    hadamards = [(p, i) for layer in config["qllm_runtime"]["layers"] for p in layer["projections"].values()
                 for i, kind in enumerate(p["kinds"]) if kind == "hadamard"]
    assert bool(hadamards) == (case not in ("cra", "qllm", "qllm_disassembly_only"))
    for p, i in hadamards:  # the Sylvester factor is rebuilt from its order, never stored (n×n at a power-of-two width)
        assert p["buffers"][f"t{i}_sylvester_order"] == [1]
        assert all(shape[0] < p["in_features"] for name, shape in p["buffers"].items() if name.startswith(f"t{i}_"))
    if "train_lowrank.learn_act_clip=true" in extra:  # each projection carries its own learned (and tuned) ratio
        clips = [p["clip"] for layer in config["qllm_runtime"]["layers"] for p in layer["projections"].values()]
        assert len(clips) == 7 * len(config["qllm_runtime"]["layers"]) and len(set(clips)) > 1
    reloaded = reload(model_dir, eval_windows, tmp_path)
    assert reloaded["ppl"] == pytest.approx(rows[variant], rel=1e-5)
    assert abs(reloaded["ppl"] / rows["fp"] - 1) > 1e-4


def test_full_precision_weights_write_a_plain_checkpoint(tiny_model_dir, tmp_path, eval_windows):
    """quant=fp16 (nothing quantized): a plain checkpoint, no quantization_config, the FP perplexity."""
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=rtn", "quant=fp16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(run)["ppl"]["wiki_sample"]
    config = json.loads((run / "quantized_model" / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    assert reload(run / "quantized_model", eval_windows, tmp_path)["ppl"] == pytest.approx(rows["fp"], rel=1e-5)


@pytest.mark.parametrize("quant, layout", [("w8a8", "int-quantized"), ("w4a8", "pack-quantized")])
def test_symmetric_weights_layout(quant, layout, tiny_model_dir, tmp_path, eval_windows):
    """8-bit codes go one per int8 (llm-compressor's W8A8 layout, the one vLLM runs with its int8 kernels), narrower
    symmetric codes packed into int32; both reload exactly."""
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=rtn", f"quant={quant}",
                    "quant.w_symmetric=true", "fuse.format=compressed-tensors"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "quantized_model" / "config.json").read_text())["quantization_config"]
    assert config["format"] == config["config_groups"]["group_0"]["format"] == layout
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is True
    rtn = read_results(run)["ppl"]["wiki_sample"]["rtn"]
    assert reload(run / "quantized_model", eval_windows, tmp_path)["ppl"] == pytest.approx(rtn, rel=1e-5)


def test_rows_of_one_sign_export_and_reload(tiny_model_dir, tmp_path, eval_windows):
    """W8 after the rotation folds the tiny model's planted norm outliers into q/k/v: some rows have one sign, whose
    min-max range would put the zero point off compressed-tensors' int8 grid (the export stopped there). Their range
    now includes 0, so the checkpoint is written and reloads to the pipeline's perplexity."""
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=rotation_qllm_gptq", "quant=w8a8",
                    "fuse.format=compressed-tensors"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    zeros = [v for f in (tmp_path / "cache" / "fuse").glob("*/block.safetensors") for k, v in load_file(f).items()
             if k.endswith(".zero")]
    assert zeros and all(0 <= float(z.min()) and float(z.max()) <= 255 for z in zeros)
    rows = read_results(run)["ppl"]["wiki_sample"]
    assert reload(run / "quantized_model", eval_windows, tmp_path)["ppl"] == pytest.approx(rows["rotation+cra+lrc+gptq"], rel=1e-5)


@pytest.mark.long
@pytest.mark.parametrize("method", ["rtn", "qllm"])  # stock, and with the shipped modeling code
def test_export_dtype_writes_the_float_tensors_smaller_and_reloads_near(method, tiny_model_dir, tmp_path, eval_windows):
    """fuse.export_dtype (default float16): the tensors beside the integer codes are written in it, config.json loads the
    model in it, the codes are the same, and the reload stays near the pipeline's perplexity (float32: exactly)."""
    from safetensors import safe_open

    cache, files = tmp_path / "cache", {}
    for dtype in ("float32", "float16", "bfloat16"):  # one cache: only the written model differs
        run = tmp_path / dtype
        proc = run_cli([*tiny_overrides(tiny_model_dir, cache, run), f"method={method}", f"fuse.export_dtype={dtype}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        files[dtype] = {}
        for shard in sorted((run / "quantized_model").glob("*.safetensors")):  # one per block: the model is streamed
            with safe_open(str(shard), "pt") as f:
                files[dtype].update({k: f.get_tensor(k) for k in f.keys()})
        assert json.loads((run / "quantized_model" / "config.json").read_text())["dtype"] == dtype
        assert read_results(run)["checkpoint"]["dtype"] == dtype
    pipeline = read_results(tmp_path / "float32")["ppl"]["wiki_sample"]
    variant = "rtn" if method == "rtn" else "cra+lrc"
    floats = [k for k, v in files["float32"].items() if v.is_floating_point() and "qllm_transforms" not in k]
    assert any(k.endswith("weight_scale") for k in floats) and any("embed_tokens" in k for k in floats)
    for dtype in ("float16", "bfloat16"):
        written = files[dtype]
        assert all(written[k].dtype == getattr(torch, dtype) for k in floats)
        assert all(torch.equal(written[k], v) for k, v in files["float32"].items() if not v.is_floating_point())  # codes
        torch.testing.assert_close(written[floats[0]].float(), files["float32"][floats[0]], rtol=1e-2, atol=1e-3)
        sizes = {d: read_results(tmp_path / d)["checkpoint"]["checkpoint_bytes"] for d in ("float32", dtype)}
        halved = sum(files["float32"][k].numel() * 2 for k in floats)
        assert abs(sizes["float32"] - sizes[dtype] - halved) < 4096  # the float tensors halved (header aside)
    for dtype, band in (("float32", 1e-5), ("float16", 2e-3)):
        reloaded = reload(tmp_path / dtype / "quantized_model", eval_windows, tmp_path)
        assert reloaded["ppl"] == pytest.approx(pipeline[variant], rel=band), dtype


@pytest.mark.parametrize("quant, strategy, n_groups", [
    ({"wbits": 4, "abits": 4}, "block", 3),  # asymmetric: one block a row, a group per row width
    ({"wbits": 4, "abits": 4, "group_size": 32}, "block", 1),  # one block a row's group: one width for all
    ({"wbits": 4, "abits": 8, "w_symmetric": True}, "channel", 1),  # symmetric: packed per channel
    ({"wbits": 8, "abits": 8}, "channel", 1),  # 8-bit: int-quantized
])
def test_every_projection_is_in_exactly_one_config_group_of_its_width(quant, strategy, n_groups):
    """Rows whose width differs (QLLM's disassembly widens some projections in some blocks) each get a config group
    whose block is their row; compressed-tensors' own matcher finds each projection in exactly one group."""
    from compressed_tensors.utils.match import match_name

    from qllm_pipeline.export.export_ct import quantization_config

    widths = {f"model.layers.{i}.{name}": width for i in range(3) for name, width in
              (("self_attn.q_proj", 64), ("self_attn.o_proj", 64), ("mlp.down_proj", 128))}
    widths["model.layers.1.self_attn.q_proj"] = 70  # disassembled in block 1 only
    config = quantization_config(quant, widths)
    groups = config.config_groups.values()
    assert len(groups) == n_groups and {g.weights.strategy for g in groups} == {strategy}
    assert config.format == ("int-quantized" if quant["wbits"] == 8 else "pack-quantized")
    if n_groups == 1:
        assert next(iter(groups)).targets == ["Linear"]
        return
    for name, width in widths.items():
        found = [g for g in groups if any(match_name(name, t) for t in g.targets)]
        assert len(found) == 1, name
        assert found[0].weights.block_structure == [1, width]
    assert "model.layers.1.self_attn.q_proj" in {t for g in groups for t in g.targets}  # named, not by suffix
    assert any(t.startswith("re:") and t.endswith("down_proj$") for g in groups for t in g.targets)


def test_a_rotated_tied_head_is_left_out_only_when_the_rebuild_gives_it(monkeypatch):
    """A tied model after the residual rotation: lm_head = (E Q) Qᵀ diag(g) Q, so the checkpoint omits it and ships
    Q and g; a head that is not that (changed after the rotation) is written as it is."""
    from types import SimpleNamespace

    from qllm_pipeline.export import export_ct
    from qllm_pipeline.export.export_ct import HEAD_KEY, _omit_rebuildable_head, rebuilt_head
    from qllm_pipeline.quantized.hadamard import random_hadamard

    monkeypatch.setattr(export_ct, "HEAD_CHECK_ROWS", 16)  # 50 rows: compared in four slices

    gen = torch.Generator().manual_seed(0)
    embed, norm, q = torch.randn(50, 16, generator=gen), torch.rand(16, generator=gen) + 0.5, random_hadamard(16, 3)
    family = SimpleNamespace(head="lm_head", embeddings="model.embed_tokens")
    rotated = {"model.embed_tokens.weight": (embed.double() @ q).float(),
               "lm_head.weight": ((embed.double() * norm.double()) @ q).float(), "model.norm.weight": torch.ones(16)}
    torch.testing.assert_close(rebuilt_head(rotated["model.embed_tokens.weight"], q, norm).float(), rotated["lm_head.weight"],
                               rtol=1e-5, atol=1e-6)
    skeleton = dict(rotated)
    extra = _omit_rebuildable_head(skeleton, family, {"rotation": q, "norm": norm})
    assert "lm_head.weight" not in skeleton and set(extra) == {f"{HEAD_KEY}.rotation", f"{HEAD_KEY}.norm"}
    head = rotated["lm_head.weight"].clone()
    head[-1] *= 1.01  # one row of the last slice changed
    changed = {**rotated, "lm_head.weight": head}
    assert _omit_rebuildable_head(changed, family, {"rotation": q, "norm": norm}) == {}
    assert "lm_head.weight" in changed
    assert _omit_rebuildable_head(dict(rotated), family, None) == {}  # not asked (no rotation, or no modeling code)
