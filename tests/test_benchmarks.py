"""The benchmark scripts run end to end in their tiny mode, so they cannot rot."""
import json
import subprocess
import sys

from conftest import REPO


def test_accuracy_benchmark_tiny(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}",
         "--quants=w4a4,w8a8", "--methods=rtn,smoothquant,rotation_qllm"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert [(r["quant"], r["method"]) for r in rows] == [
        ("w4a4", "rtn"), ("w4a4", "smoothquant"), ("w4a4", "rotation+cra+lrc"),
        ("w8a8", "rtn"), ("w8a8", "smoothquant"), ("w8a8", "rotation+cra+lrc"),
    ]
    assert all(r["ppl"] > 0 and r["fp"] == rows[0]["fp"] for r in rows)
    assert len({r["ppl"] for r in rows}) == len(rows)  # every run produced its own model
    # every run computed its own stages (a fresh cache); the rotation is computed once and then shared
    assert {"smooth", "fuse", "evaluate"} <= set(rows[1]["stages"])
    assert {"rotate", "search_theta", "train_lowrank"} <= set(rows[2]["stages"])
    assert "rotate" not in rows[5]["stages"] and "train_lowrank" in rows[5]["stages"]
    assert all(s["peak_rss_mib"] > 0 for r in rows for s in r["stages"].values())
    md = (tmp_path / "accuracy.md").read_text()
    assert "| rotation+cra+lrc |" in md and "| fp |" in md and "w8a8" in md


def test_scaling_benchmark_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--tiny", f"--out={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert {(r["hidden"], r["blocks"]) for r in result["rows"]} == {(64, 1), (128, 1), (64, 2)}
    assert set(result["exponents"]) == {"hidden", "params per block", "blocks"}
    assert all(r["search_theta_s"] > 0 and r["train_lowrank_s"] > 0 for r in result["rows"])
