"""Every bad setting is refused before any weight is read, with one exact `error:` line (checked in-process here, so the
table is fast; tests/test_cli_errors.py checks the same path end to end through the CLI: one line, exit code 2)."""
import time

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, tiny_overrides
from qllm_pipeline.core import cli
from qllm_pipeline.core.errors import PipelineError

GROUPS_NOTE = "the widths of the tiny model: hidden 64, intermediate 128"
BAD = [
    ("eval.seq_len=0", "eval.seq_len=0 is out of range: an integer >= 2 (a window predicts its next tokens)"),
    ("eval.seq_len=1", "eval.seq_len=1 is out of range: an integer >= 2 (a window predicts its next tokens)"),
    ("pipeline.batch_size=0", "pipeline.batch_size=0 is out of range: >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 is out of range: >= 1"),
    ("search_theta.channel_ratio=0.9", "search_theta.channel_ratio=0.9 is too large for channel assembly: merging that "
     "many pairs needs more ordinary channels than remain; use at most 0.3 (QLLM: 0.2), or reassemble.assemble=false"),
    ("quant.group_size=64 reassemble.assemble=false", "quant.group_size=64 needs reassemble.assemble=true: disassembly "
     "alone adds channels, so the input width changes and no group size divides it; set reassemble.assemble=true or "
     "quant.group_size=null"),
    ("train_lowrank.weight_decay=-1", "train_lowrank.weight_decay=-1 is out of range: a finite number >= 0"),
    ("train_lowrank.lr=inf", "train_lowrank.lr=inf must be a finite number (a finite number > 0)"),
    ("train_lowrank.seed=x", "train_lowrank.seed='x' must be an integer"),
    ("train_lowrank.rank=0", "train_lowrank.rank=0 is out of range: >= 1"),
    ("train_lowrank.rank=4,0", "train_lowrank.rank=0 is out of range: >= 1"),  # each value of a sweep
    ("train_lowrank.rnak=4", "unknown key train_lowrank.rnak; train_lowrank has ['act_clip_lr', 'act_clip_shared', "
     "'autocast', 'batch_size', 'enabled', 'epochs', 'learn_act_clip', 'lr', 'rank', 'seed', 'train_norms', "
     "'weight_decay']"),
    ("+trian_lowrank.rank=4", "unknown config section 'trian_lowrank'; the sections are ['calibrate', 'data', 'eval', "
     "'fuse', 'gptq', 'logger', 'model', 'pipeline', 'quant', 'reassemble', 'rotate', 'search_theta', 'smooth', "
     "'train_lowrank', 'tune_e2e']"),
    ("train_lowrank.autocast=fp8", "train_lowrank.autocast='fp8' is not one of ['auto', 'none', 'bf16', 'fp16']"),
    ("search_theta.theta=abc", "search_theta.theta='abc' must be a positive number (or null to search)"),
    ("search_theta.steps=0", "search_theta.steps=0 is out of range: a positive integer, or null for the reference grid"),
    ("search_theta.spacing=cubic", "search_theta.spacing='cubic' is not one of ['linear', 'log']"),
    ("pipeline.device=cuda:7", "pipeline.device=cuda:7 but no CUDA device is available; use pipeline.device=cpu or auto"),
    ("pipeline.device=abacus", "pipeline.device=abacus is not a device name; use auto, cpu, cuda or cuda:N"),
    ("pipeline.cache_dir=/proc/qllm_cache", "pipeline.cache_dir=/proc/qllm_cache is not writable (No such file or "
     "directory); choose a directory you can write"),
    ("eval.datasets=[wikitext3]", "unknown eval.datasets entry 'wikitext3'; choose from ['c4', 'calib_heldout', "
     "'lee_news', 'text_files', 'wiki_sample', 'wikitext2']"),
    ("eval.datasets=[] eval.tasks=[]", "eval.datasets and eval.tasks are both empty: nothing to evaluate; list a dataset, "
     "e.g. eval.datasets=[wiki_sample]"),
    ("eval.max_windows=0", "eval.max_windows=0 is out of range: a positive integer, or null for the whole text"),
    ("eval.limit=1.5", "eval.limit=1.5 must be null, a positive count or a fraction in (0, 1)"),
    ("eval.tasks=[no_such_task_xyz]", "unknown lm-eval task 'no_such_task_xyz'; see `lm-eval ls tasks` or use "
     "eval.tasks=[qllm_smoke]"),
    ("quant.a_clip_ratio=0", "quant.a_clip_ratio=0 is out of range: in (0, 1]; 1.0 means no clipping"),
    ("method=rotation_lrc_gptq +tune_e2e.scale_lr.four=0.004", "tune_e2e.scale_lr has the key 'four'; its keys "
     "are weight bit widths, e.g. {{4: 0.004}}"),
    ("quant.a_clip_ratio={{x:0.9}}", "quant.a_clip_ratio has the key 'x'; its keys are activation bit widths, e.g. "
     "{{4: 0.85}}"),
    ("method=rotation_lrc_gptq tune_e2e.batch_size={{4:0}}", "tune_e2e.batch_size.4=0 is out of range: >= 1"),
    ("method=rotation_lrc_gptq +tune_e2e.batch_size.six=4", "tune_e2e.batch_size has the key 'six'; its keys are "
     "weight bit widths, e.g. {{4: 1}}"),
    ("method=rotation_lrc_gptq tune_e2e.scale_lr={{4:-1}}", "tune_e2e.scale_lr.4=-1 is out of range: a finite number "
     ">= 0 (0: scales not tuned)"),
    ("quant.wbits=1", "quant.wbits=1 is out of range: an integer in 2..16, or null for full precision"),
    ("quant.abits=17", "quant.abits=17 is out of range: an integer in 2..16, or null for full precision"),
    ("quant.weight_algorithm=adaround", "quant.weight_algorithm='adaround' is not one of ['rtn', 'gptq']"),
    ("quant.group_size=48", "quant.group_size=48 does not divide the layer width 64 of model=tiny; use a divisor of "
     "both hidden and intermediate size, or null"),
    ("calibrate.n_samples=0", "calibrate.n_samples=0 is out of range: >= 1"),
    ("calibrate.seq_len=1024", "calibrate.seq_len=1024 exceeds the model's context of 256 tokens; lower it"),
    ("gptq.damp=1.5", "gptq.damp=1.5 is out of range: >= 0 and < 1"),
    ("smooth.alpha=2", "smooth.alpha=2 is out of range: >= 0 and <= 1"),
    ("model.dtype=int8", "model.dtype='int8' is not one of ['float32', 'float16', 'bfloat16']"),
    ("rotate.online_down=maybe", "rotate.online_down='maybe' must be true or false"),
    ("fuse.format=onnx", "fuse.format='onnx' is not one of ['qllm-packed', 'compressed-tensors']"),
    ("quant.wbits=12 fuse.format=compressed-tensors", "fuse.format=compressed-tensors cannot hold 12-bit weights "
     "(compressed-tensors' integer formats hold 1 to 8 bits); use fuse.format=qllm-packed"),
    ("logger.kind=tensorboard", "logger.kind='tensorboard' is not one of ['none', 'wandb']"),
    ("pipeline.stages=[calibrate,reassemble,fuse]", "stage reassemble needs stage search_theta; add search_theta to "
     "pipeline.stages or remove reassemble"),
    ("calibrate.n_samples=1000000 pipeline.host_memory_gb=16", "the memory plan needs 23.6 GiB of host memory at stage "
     "search_theta, above the 14.9 GiB that pipeline.host_memory_gb allows; lower calibrate.n_samples or "
     "calibrate.seq_len, or set pipeline.memory_check=false to run anyway"),
    ("pipeline.host_memory_gb=0", "pipeline.host_memory_gb=0 is out of range: a number of GB > 0, or null for what the "
     "host has available"),
    ("tune_e2e.mode=eager", "tune_e2e.mode='eager' is not one of ['streamed', 'whole']"),
    ("data=text_files", "data.calib_path must be set for data=text_files: add data.calib_path=PATH"),
    ("data=text_files data.calib_path={empty} data.eval_path={empty}", "data.calib_path={empty} is empty; it must hold "
     "the text to calibrate on"),
    ("data=text_files data.calib_path={text} data.eval_path={empty}", "data.eval_path={empty} is empty; it must hold the "
     "text to evaluate on"),
    ("data=text_files data.calib_path={text} data.eval_path=/no/such.txt", "data.eval_path=/no/such.txt is not a "
     "readable file; point it at a UTF-8 text file"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_setting_is_one_exact_error_before_weights(override, message, tiny_model_dir, tmp_path, monkeypatch):
    empty, text = tmp_path / "empty.txt", tmp_path / "text.txt"
    empty.write_text("")
    text.write_text("Some text to read.")
    fill = {"empty": empty, "text": text}
    loaded = []
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr("qllm_pipeline.model.model_loading.load_model", lambda *a, **k: loaded.append(1))
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), *override.format(**fill).split()]
    overrides = [o for o in overrides if not o.startswith("hydra.")]
    started = time.perf_counter()
    with pytest.raises(PipelineError) as err:  # the CLI's order: the command line, then the composed config
        cli.check_command_line(overrides)
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        cli.check_before_loading(cli.resolved_config(cfg))
    assert str(err.value) == message.format(**fill)
    assert "\n" not in str(err.value)
    assert loaded == []  # refused before any weight was read
    assert time.perf_counter() - started < 15
    assert not (tmp_path / "cache" / "calibrate").exists()


def test_the_table_is_large_and_distinct():
    assert len(BAD) >= 25 and len({b[0] for b in BAD}) == len(BAD)
