"""The memory plan covers every stage of every method, fits the models users quantize on one 80 GB GPU and a 32 GB
host, and a run whose plan does not fit is refused before any weight is read."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.plan import GPU_BYTES, HOST_BUDGET_BYTES, check_fits, e2e_execution, e2e_host, run_plan
from qllm_pipeline.core.working_sets import e2e_working_set

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
PAPER = ["quant=w4a4", "calibrate.n_samples=128", "calibrate.seq_len=2048"]


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=False)


@pytest.mark.parametrize("model", ["llama2_7b", "llama2_13b", "llama2_70b"])
def test_every_method_fits_one_80gb_gpu_and_a_32gb_host_at_the_papers_calibration(model):
    for method in METHODS:
        cfg = config(f"model={model}", f"method={method}", *PAPER)
        plan = run_plan(cfg, dict(cfg["model"]["arch"]), "cuda", host_budget=HOST_BUDGET_BYTES)
        selected = [s for s in cfg["pipeline"]["stages"] if s not in ("search_theta", "reassemble")
                    or cfg["quant"]["abits"] is not None]
        assert set(plan["host_per_stage"]) == set(plan["stage_working_sets"]) == set(selected), method  # every stage
        assert plan["device_peak_bytes"] <= GPU_BYTES, (model, method, plan["stage_working_sets"])
        assert plan["host_peak_bytes"] <= HOST_BUDGET_BYTES, (model, method, plan["host_per_stage"])


def test_streamed_tuning_holds_one_block_and_the_whole_model_path_all_of_them():
    cfg = config("model=llama2_70b", "method=rotation_lrc_gptq", *PAPER)
    arch = dict(cfg["model"]["arch"])
    streamed = e2e_working_set(arch, 2048, 2, "streamed")
    whole = e2e_working_set(arch, 2048, 2, "whole")
    deeper = e2e_working_set({**arch, "num_hidden_layers": 160}, 2048, 2, "streamed")
    assert streamed == deeper < 30 * 2**30 < GPU_BYTES < whole  # depth costs the streamed stage nothing
    cfg["tune_e2e"]["mode"] = "whole"
    plan = run_plan(cfg, arch, "cuda", host_budget=HOST_BUDGET_BYTES)
    assert plan["stage_working_sets"]["tune_e2e"] == whole
    with pytest.raises(PipelineError) as err:
        check_fits(plan, {"device": GPU_BYTES, "host": HOST_BUDGET_BYTES, "device_source": "the device has",
                          "host_source": "this host has available"})
    assert str(err.value) == (
        f"the memory plan needs {whole / 2**30:.1f} GiB on the cuda device at stage tune_e2e, above the 74.5 GiB the "
        "device has; set tune_e2e.mode=streamed, or set pipeline.memory_check=false to run anyway")


def test_the_tuning_plan_takes_the_batch_size_of_the_runs_weight_width():
    """The recipe's tune_e2e.batch_size {4: 1, 6: 16} is planned as the size its run trains with."""
    by_width = {}
    for quant, size in (("w4a4", 1), ("w6a6", 16)):
        recipe = config("model=llama2_7b", "method=rotation_lrc_gptq", f"quant={quant}")
        assert isinstance(recipe["tune_e2e"]["batch_size"], dict)
        plans = [run_plan(c, dict(c["model"]["arch"]), "cuda", host_budget=HOST_BUDGET_BYTES)["stage_working_sets"]
                 for c in (recipe, config("model=llama2_7b", "method=rotation_lrc_gptq", f"quant={quant}",
                                          f"tune_e2e.batch_size={size}"))]
        assert plans[0]["tune_e2e"] == plans[1]["tune_e2e"]
        by_width[quant] = plans[0]["tune_e2e"]
    assert by_width["w6a6"] > by_width["w4a4"]


def test_tuning_keeps_the_fused_blocks_when_the_host_has_room_and_spills_inputs_only_when_it_has_none():
    cfg = config("model=llama2_7b", "method=rotation_lrc_gptq", "quant=w4a4", "calibrate.n_samples=128",
                 "calibrate.seq_len=2048", "tune_e2e.batch_size=4")
    arch = dict(cfg["model"]["arch"])
    peak = {(keep, spill): e2e_host(cfg, arch, "cuda", keep, spill)[0] for keep in (True, False) for spill in (True, False)}
    assert peak[True, False] > peak[False, False] > peak[False, True]
    assert e2e_execution(cfg, arch, "cuda", None) == {"keep_blocks": True, "spill_inputs": False}
    assert e2e_execution(cfg, arch, "cuda", peak[True, False]) == {"keep_blocks": True, "spill_inputs": False}
    assert e2e_execution(cfg, arch, "cuda", peak[True, False] - 1) == {"keep_blocks": False, "spill_inputs": False}
    assert e2e_execution(cfg, arch, "cuda", peak[False, False] - 1) == {"keep_blocks": False, "spill_inputs": True}


def test_the_first_load_of_a_gguf_file_counts_its_float_copy_and_a_plan_it_breaks_names_the_switch():
    """Writing a GGUF file's float copy serializes the weights once more (qllm_pipeline.model.gguf_copy): the plan
    holds them twice at stage `load`, only for a whole load that writes a copy, and a host too small for it is told
    how to skip the copy."""
    from qllm_pipeline.core.plan import RUNTIME_BYTES
    from qllm_pipeline.core.working_sets import skeleton_params

    cfg = config("model=llama2_7b", "method=qllm")
    arch = dict(cfg["model"]["arch"])
    plain, copying = (run_plan(cfg, arch, "cpu", streamed=False, float_copy=c) for c in (False, True))
    model_bytes = skeleton_params(arch) * 2 + arch["num_hidden_layers"] * copying["block_bytes"]
    assert "load" not in plain["host_per_stage"] and "load" not in run_plan(cfg, arch, "cpu", float_copy=True)["host_per_stage"]
    assert copying["host_per_stage"]["load"] == RUNTIME_BYTES + 2 * model_bytes == copying["host_peak_bytes"]
    assert {k: v for k, v in copying["host_per_stage"].items() if k != "load"} == plain["host_per_stage"]
    budget = copying["host_peak_bytes"] - 1
    with pytest.raises(PipelineError) as err:
        check_fits(copying, {"device": None, "host": budget, "device_source": "", "host_source": "this host has available"})
    assert str(err.value) == (
        f"the memory plan needs {copying['host_peak_bytes'] / 2**30:.1f} GiB of host memory at stage load, above the "
        f"{budget / 2**30:.1f} GiB this host has available; set QLLM_GGUF_CACHE=off (the GGUF file is then read on "
        "every run instead of a float copy), or set pipeline.memory_check=false to run anyway")
    check_fits(plain, {"device": None, "host": budget, "device_source": "", "host_source": ""})  # fits without it


def test_gptq_at_70b_needs_well_under_20_gib_of_the_device():
    cfg = config("model=llama2_70b", "method=gptq", *PAPER)
    plan = run_plan(cfg, dict(cfg["model"]["arch"]), "cuda")
    assert plan["stage_working_sets"]["fuse"] < 15 * 2**30  # the float64 reference route needed 31 GiB


# `python -m qllm_pipeline ARGS` with an audit hook that records every file opened or directory listed under
# $WATCH_DIR, written to $WATCH_LOG at exit: what a run read, whatever the machine's load.
AUDITED_RUN = """
import atexit, os, runpy, sys
watch, seen = os.environ["WATCH_DIR"], []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir", "glob.glob") and args and str(args[0]).startswith(watch):
        seen.append(f"{event} {os.path.relpath(str(args[0]), watch)}")
sys.addaudithook(hook)
atexit.register(lambda: open(os.environ["WATCH_LOG"], "w").write("\\n".join(seen)))
sys.argv = ["qllm_pipeline", *sys.argv[1:]]
runpy.run_module("qllm_pipeline", run_name="__main__", alter_sys=True)
"""


def test_a_run_whose_plan_does_not_fit_is_refused_before_any_weight(tmp_path):
    """A LLaMA-2-70B checkpoint of which only config.json exists, asked for the best recipe with every block tuned on
    the device at once (tune_e2e.mode=whole) on this CPU with a 32 GB host: refused in one line, naming the stage and
    the setting, having read the model's config.json and nothing else of it (no weight looked for)."""
    import os

    from transformers import LlamaConfig

    model = tmp_path / "llama2_70b"
    LlamaConfig(**config("model=llama2_70b")["model"]["arch"], torch_dtype="float16").save_pretrained(model)
    proc = subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, "model=llama2_70b", f"model.path={model}", "model.hub_id=null",
         "method=rotation_lrc_gptq", "tune_e2e.mode=whole", "pipeline.device=cpu", "pipeline.host_memory_gb=32",
         f"pipeline.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WATCH_DIR": str(model), "WATCH_LOG": str(tmp_path / "read.log")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("error: the memory plan needs ")
    assert errors[0].endswith(" GiB of host memory at stage tune_e2e, above the 29.8 GiB that pipeline.host_memory_gb "
                              "allows; set tune_e2e.mode=streamed, or set pipeline.memory_check=false to run anyway")
    assert set((tmp_path / "read.log").read_text().splitlines()) == {"open config.json"}
    assert not (tmp_path / "cache").exists()  # refused before the cache, the model or the data were touched


def test_plan_only_writes_the_budget_it_was_checked_against(tmp_path):
    from conftest import run_cli

    proc = run_cli(["model=llama2_70b", "method=rotation_lrc_gptq", *PAPER, "pipeline.plan_only=true",
                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((Path(tmp_path) / "run" / "plan.json").read_text())
    assert plan["fits"] and plan["budget"] == {"device": GPU_BYTES, "host": HOST_BUDGET_BYTES}
    assert "tune_e2e (streamed): fused blocks rebuilt on each pass" in proc.stdout


def test_a_plan_made_before_the_gguf_package_is_installed_counts_the_copy_its_first_load_writes():
    """plan_only works from the config group's `arch` alone (no package installed): the copy's write is counted,
    since the first load after installing will write it."""
    from qllm_pipeline.model.model_loading import ModelSource, writes_float_copy

    assert writes_float_copy(ModelSource(name="m", package="no_such_gguf_package", gguf_file="m.gguf"))
    assert not writes_float_copy(ModelSource(name="m", hub_id="org/m"))  # safetensors: streamed, no copy
