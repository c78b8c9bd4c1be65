"""Bad input: one `error:` line naming the key and what to do, exit code 2, nothing half-written in the cache."""
import json

import pytest

from conftest import run_cli, tiny_overrides


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=llama5_1t", "unknown model=llama5_1t"),
        ("quant=w3a3", "unknown quant=w3a3"),
        ("quant.wbits=1", "quant.wbits=1 is out of range: an integer in 2..16"),
        ("quant.abits=17", "quant.abits=17 is out of range: an integer in 2..16"),
        ("quant.a_clip_ratio=1.5", "quant.a_clip_ratio=1.5 is out of range: in (0, 1]; 1.0 means no clipping"),
        ("pipeline.stages=[calibrate,evaluate]", "must include calibrate and fuse"),
        ("pipeline.stages=[calibrate,reassemble,fuse]", "reassemble needs stage search_theta"),
        ("pipeline.force=[frobnicate]", "unknown stage 'frobnicate'"),
        ("search_theta.points=[qk]", "unknown point(s) ['qk']"),
        ("train_lowrank.rank=0", "train_lowrank.rank=0"),
        ("model.package=no_such_model_pkg", "which is not installed: pip install no-such-model-pkg"),
        ("quant.weight_algorithm=adaround", "quant.weight_algorithm='adaround' is not one of ['rtn', 'gptq']"),
        ("quant.weight_algorithm=gptq gptq.damp=2", "gptq.damp=2 is out of range: >= 0 and < 1"),
        ("method=rotation rotate.online_down=maybe", "rotate.online_down='maybe' must be true or false"),
        ("search_theta.steps=0", "search_theta.steps=0 is out of range: a positive integer, or null for the reference grid"),
        ("search_theta.theta=abc", "search_theta.theta='abc' must be a positive number"),
        ("quant.wbitz=4", "unknown key quant.wbitz; quant has ["),
        ("train_lowrank.lr=inf", "train_lowrank.lr=inf must be a finite number"),
    ],
)
def test_config_errors_fail_fast_with_one_line(override, expected, tmp_path):
    proc = run_cli([*override.split(), "pipeline.progress=false", f"pipeline.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override, expected",
    [
        ("quant.group_size=48", "quant.group_size=48 does not divide"),
        ("calibrate.seq_len=1024", "calibrate.seq_len=1024 exceeds the model's context of 256"),
        ("eval.seq_len=300", "eval.seq_len=300 exceeds"),
    ],
)
def test_model_dependent_errors(tiny_model_dir, tmp_path, override, expected):
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), override])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "cache" / "calibrate").exists() or not any((tmp_path / "cache" / "calibrate").iterdir())


def test_unsupported_family_is_refused(tmp_path):
    """In a real process (most errors here go through main() in-process): the exit status and the one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    proc = run_cli(
        [f"model.path={tmp_path / 'gpt2'}", "model.package=null", "model.gguf_file=null", "model.name=tiny_gpt2",
         f"pipeline.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"], in_process=False
    )
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "'gpt2' model" in lines[0] and "(model_type in ['llama', 'mistral', 'qwen2', 'qwen3', 'gemma3_text'])" in lines[0]


@pytest.mark.parametrize("weights, gguf, expected", [
    (None, "null", "model.path={model} holds no weight files (*.safetensors, *.bin, *.gguf, *.pt, *.pth); point it at "
     "a whole checkpoint directory (config.json and its weights)"),
    ("model.safetensors", "model.gguf", "model.gguf_file=model.gguf is not a file in {model}; check model.gguf_file, or "
     "set it to null for a safetensors checkpoint"),
])
def test_a_model_directory_without_its_weights_is_one_error_line(tiny_model_dir, tmp_path, weights, gguf, expected):
    """A checkpoint directory with its config and tokenizer but not the weight file asked for: one line, before any
    artifact (transformers' own OSError and traceback otherwise)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    if weights:
        shutil.copy(tiny_model_dir / weights, model / weights)
    proc = run_cli([*tiny_overrides(model, tmp_path / "cache", tmp_path / "run"), f"model.gguf_file={gguf}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert error_lines(proc) == [f"error: {expected.format(model=model)}"] and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "calibrate").exists()


def test_too_short_corpus_leaves_no_artifact(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.")
    proc = run_cli(
        [*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), "data=text_files",
         f"data.calib_path={short}", f"data.eval_path={short}"]
    )
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "too few for calibrate.seq_len=32" in lines[0], proc.stderr[-2000:]
    calib = tmp_path / "cache" / "calibrate"
    assert calib.exists() and list(calib.iterdir()) == []  # the writer was opened, then removed whole


def test_missing_text_file(tiny_model_dir, tmp_path):
    proc = run_cli(
        [*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), "data=text_files",
         f"data.calib_path={tmp_path}/nope.txt", f"data.eval_path={tmp_path}/nope.txt"]
    )
    assert proc.returncode == 2
    assert "data.calib_path" in error_lines(proc)[0]


def test_plan_only_for_70b_needs_no_weights_and_fits_80gb(tmp_path):
    proc = run_cli(["model=llama2_70b", "quant=w4a4", "pipeline.plan_only=true", "calibrate.n_samples=128",
                    "calibrate.seq_len=2048", f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "80 blocks" in proc.stdout and "fits one 80 GB GPU: yes" in proc.stdout
    assert "cached inputs (128×2048)" in proc.stdout
    # the blocks stream from the safetensors shards: the host holds a block, not the 128.5 GiB model (#13)
    assert "one block at a time (streamed from safetensors)" in proc.stdout
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["host_peak_bytes"] <= 32e9 and plan["device_peak_bytes"] <= 80e9
    assert plan["host_peak_bytes"] < plan["host_model_bytes"] / 4
    assert "within a 32 GB host" in proc.stdout


def test_plan_only_host_peak_of_a_model_loaded_whole(tmp_path):
    proc = run_cli(["model=llama2_70b", "quant=w4a4", "pipeline.plan_only=true", "model.load=whole",
                    f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["resident"]["blocks held whole"] == 80 * plan["block_bytes"]
    assert "ABOVE a 32 GB host" in proc.stdout
