"""benchmarks/heldout_sweep.py: one setting compared on held-out calibration windows, chosen there, in its tiny mode."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "heldout_sweep.py"


def run(args, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, **kwargs)


def test_heldout_sweep_tiny_chooses_on_heldout_windows(tiny_model_dir, tmp_path):
    # a row of another method already in the results: the new invocation keeps it
    other = {"method": "rotation", "quant": "w4a4", "model": "tiny", "value": "1.0", "overrides": [], "key": "quant.a_clip_ratio",
             "wall_s": 1.0, "calib_heldout": {"variant": "rotation", "ppl": 2.0, "fp": 1.0, "ratio": 2.0},
             "wiki_sample": {"variant": "rotation", "ppl": 2.0, "fp": 1.0, "ratio": 2.0}}
    (tmp_path / "heldout_quant_a_clip_ratio.json").write_text(json.dumps({"key": "quant.a_clip_ratio", "rows": [other]}))
    proc = run(["--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}", "--method=rtn",
                "--sweep", "quant.a_clip_ratio=1.0,0.5", "eval.max_windows=2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "heldout_quant_a_clip_ratio.json").read_text())
    assert data["rows"][0] == other
    rows = data["rows"][1:]
    assert [(r["value"], r["method"], r["quant"]) for r in rows] == [("1.0", "rtn", "w4a4"), ("0.5", "rtn", "w4a4")]
    for r in rows:  # chosen on held-out windows; the evaluation windows are not even evaluated
        assert r["calib_heldout"]["variant"] == "rtn" and "wiki_sample" not in r
        assert r["calib_heldout"]["windows"]["count"] == 2
        assert r["calib_heldout"]["ratio"] == pytest.approx(r["calib_heldout"]["ppl"] / r["calib_heldout"]["fp"], rel=1e-3)
    # the clip changes the quantized model, not the FP reference
    assert rows[0]["calib_heldout"]["fp"] == rows[1]["calib_heldout"]["fp"]
    assert rows[0]["calib_heldout"]["ppl"] != rows[1]["calib_heldout"]["ppl"]
    best = min(rows, key=lambda r: r["calib_heldout"]["ratio"])
    md = (tmp_path / "heldout_quant_a_clip_ratio.md").read_text()
    # the header's "**bold**" note, the other method's only row (chosen within its group) and this sweep's choice
    assert f"| **{best['value']}** |" in md and md.count("**") == 6
    assert "wiki_sample" not in md and "| **1.0** ‡ |" in md  # the old row (no windows recorded) is marked


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "quant.a_clip_ratio=0.9"], "at least two values"),
    (["--sweep", "quant.a_clip_ratio=0.9,0.9"], "repeats a value"),
    (["--sweep", "x=1,2", "--method", "awq"], "--method=awq is not a conf/method option"),
    (["--sweep", "x=1,2", "eval.datasets=[wiki_sample]"], "which the benchmark sets itself"),
    (["--sweep", "x=1,2", "--tiny"], "--tiny needs --tiny-model-dir"),
])
def test_heldout_sweep_bad_input_is_one_error_line(args, needle):
    proc = run(args, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
