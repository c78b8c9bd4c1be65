"""benchmarks/theta_grid.py runs end to end in its tiny mode, and refuses bad command-line input with one error line."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "theta_grid.py"


@pytest.mark.long
def test_theta_grid_benchmark_tiny(tiny_model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}",
         "--grids=linear/100,log/null", "eval.max_windows=2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[theta_grid") and " grid " in line]
    assert len(progress) == 2  # one line per grid
    result = json.loads((tmp_path / "theta_grid.json").read_text())
    rows = result["rows"]
    assert [(r["grid"], r["spacing"], r["steps"], r["status"]) for r in rows] == [
        ("linear/100", "linear", 100, "ok"), ("log/null", "log", None, "ok")]
    assert "eval.max_windows=2" in result["pipeline_overrides"] and "method=cra" in result["pipeline_overrides"]
    for r in rows:
        assert r["row"] == "cra"
        assert set(r["ppl"]) == {"calib_heldout", "wiki_sample"}
        assert all(v > 0 for d in r["ppl"].values() for v in d.values())
        assert r["search_theta_computed"] == 3 and r["search_theta_s"] > 0  # the shared cache never serves another grid
        assert len(r["search_theta_keys"]) == 3
        assert r["theta"]["all"]["blocks"] == 3 and r["theta"]["all"]["grid_points"] >= 3
        for point in ("qkv", "gate_up", "down"):
            assert r["theta"][point]["ratio"] <= 1.0  # the baseline (no split) is the grid's first point
        d = r["detail"]
        assert d["block"] == 2 and d["requested_block"] == 11 and d["point"] == "down"  # clamped to the last block
        assert d["loss"] <= d["baseline_loss"] and d["grid_points"] >= 1 and d["theta"] <= d["max_abs_x"]
    # the two grids searched different candidates
    assert rows[0]["search_theta_keys"] != rows[1]["search_theta_keys"]
    # fp and rtn do not depend on the grid; the second grid read them from the shared cache
    assert rows[0]["ppl"]["wiki_sample"]["fp"] == rows[1]["ppl"]["wiki_sample"]["fp"]
    assert rows[1]["stages"]["calibrate"]["computed"] == 0
    md = (tmp_path / "theta_grid.md").read_text()
    assert "| linear/100 |" in md or "| **linear/100** |" in md
    assert "## Reading" in md and "best grid is" in md and "calib_heldout" in md


@pytest.mark.parametrize("args, needle", [
    (["--grids", "cubic/10"], "SPACING/STEPS"),
    (["--grids", "log/0"], "positive integer or null"),
    (["--grids", "log/100,log/100"], "repeats a grid"),
    (["--grids", ""], "--grids is empty"),
    (["search_theta.steps=50"], "use --grids"),
    (["eval.datasets=[wiki_sample]"], "drops calib_heldout"),
    (["quant=w4a4,w8a8"], "is a sweep"),
    (["--detail-point", "attn"], "--detail-point"),
    (["--tiny"], "--tiny needs --tiny-model-dir"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_input_is_one_error_line(args, needle):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
