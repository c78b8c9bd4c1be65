"""benchmarks/heldout_sweep.py and heldout_rule.py: settings compared on held-out calibration windows, chosen there by one
rule, in their tiny mode."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "heldout_sweep.py"
RULE = REPO / "benchmarks" / "heldout_rule.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import heldout_rule  # noqa: E402
import heldout_sweep  # noqa: E402


def run(args, **kwargs):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, **kwargs)


def test_heldout_rule_tiny_chooses_on_heldout_windows(tiny_model_dir, tmp_path):
    """The rule (heldout_rule.py) over one key, through heldout_sweep.py: rows per value on calib_heldout only, the
    default added to the candidates, and the verdict the paired interval gives."""
    # a row of another method already in the sweep's results: the new invocation keeps it
    other = {"method": "rotation", "quant": "w4a4", "model": "tiny", "value": "1.0", "overrides": [], "key": "quant.a_clip_ratio",
             "wall_s": 1.0, "calib_heldout": {"variant": "rotation", "ppl": 2.0, "fp": 1.0, "ratio": 2.0},
             "wiki_sample": {"variant": "rotation", "ppl": 2.0, "fp": 1.0, "ratio": 2.0}}
    per_key = tmp_path / "heldout_rule"  # the rule's own sweep files, apart from the hand-run sweeps' files
    per_key.mkdir()
    (per_key / "heldout_quant_a_clip_ratio.json").write_text(json.dumps({"key": "quant.a_clip_ratio", "rows": [other]}))
    rule = tmp_path / "rule.yaml"
    rule.write_text("- {model: smollm2_135m, method: rtn, quant: w4a4, sweeps: {quant.a_clip_ratio: [0.5]}}\n")
    proc = subprocess.run([sys.executable, str(RULE), "--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}",
                           f"--rule={rule}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not (tmp_path / "heldout_quant_a_clip_ratio.json").exists()
    data = json.loads((per_key / "heldout_quant_a_clip_ratio.json").read_text())
    assert data["rows"][0] == other
    rows = data["rows"][1:]
    # the default (1.0: rtn clips nothing) competes although the rule file lists only 0.5
    assert [(r["value"], r["method"], r["quant"]) for r in rows] == [("0.5", "rtn", "w4a4"), ("1.0", "rtn", "w4a4")]
    for r in rows:  # chosen on held-out windows; the evaluation windows are not even evaluated
        assert r["calib_heldout"]["variant"] == "rtn" and "wiki_sample" not in r
        assert r["calib_heldout"]["windows"]["count"] == len(r["calib_heldout"]["window_nll"]) == 4
        assert r["calib_heldout"]["ratio"] == pytest.approx(r["calib_heldout"]["ppl"] / r["calib_heldout"]["fp"], rel=1e-3)
    # the clip changes the quantized model, not the FP reference
    assert rows[0]["calib_heldout"]["fp"] == rows[1]["calib_heldout"]["fp"]
    assert rows[0]["calib_heldout"]["ppl"] != rows[1]["calib_heldout"]["ppl"]
    best = min(rows, key=lambda r: r["calib_heldout"]["ratio"])
    md = (per_key / "heldout_quant_a_clip_ratio.md").read_text()
    # the header's "**bold**" note, the other method's only row (chosen within its group) and this sweep's choice
    assert f"| **{best['value']}** |" in md and md.count("**") == 6
    assert "wiki_sample" not in md and "| **1.0** ‡ |" in md  # the old row (no windows recorded) is marked
    verdict = json.loads((tmp_path / "heldout_rule.json").read_text())["rows"]
    assert len(verdict) == 1 and verdict[0]["default"] == "1.0" and verdict[0]["best"] == best["value"]
    assert verdict[0] == {**verdict[0], **heldout_rule.decide(rows, 1.0)}
    rule_md = (tmp_path / "heldout_rule.md").read_text()
    assert f"| tiny | rtn | w4a4 | `quant.a_clip_ratio` | 0.5: {rows[0]['calib_heldout']['ratio']:.4f}" in rule_md
    assert "wiki_sample" not in rule_md


def _row(value, nll):
    return {"value": value, "calib_heldout": {"ratio": math.exp(sum(nll) / (len(nll) * 10)), "window_nll": nll,
                                              "tokens_per_window": 10}}


def test_the_rule_adopts_a_value_only_beyond_the_paired_interval():
    base = [20.0, 30.0, 25.0, 40.0, 22.0, 35.0, 28.0, 31.0]
    better = [x - 2.0 for x in base]  # lower on every window: beyond noise
    noisy = [x + d for x, d in zip(base, [-9, 8, -7, 6, -9, 7, -8, 6])]  # lower on average, not on the windows
    assert sum(noisy) < sum(base)
    adopt = heldout_rule.decide([_row("1e-3", base), _row("2e-3", better)], 1e-3)
    assert adopt["chosen"] == "2e-3" and adopt["ci"][1] < 0 and adopt["why"].endswith("adopt")
    tie = heldout_rule.decide([_row("1e-3", base), _row("2e-3", noisy)], 0.001)
    assert tie["best"] == "2e-3" and tie["chosen"] == "1e-3" and tie["ci"][0] < 0 < tie["ci"][1]
    keep = heldout_rule.decide([_row("1e-3", better), _row("2e-3", base)], "1e-3")
    assert keep["chosen"] == "1e-3" and keep["ci"] is None and keep["candidates"] == {
        "1e-3": _row("", better)["calib_heldout"]["ratio"], "2e-3": _row("", base)["calib_heldout"]["ratio"]}


def test_the_rule_file_names_every_tuned_default_with_its_current_value_competing():
    entries = heldout_rule.load_rule(REPO / "benchmarks" / "heldout_rule.yaml")
    assert {(e["method"], e["quant"]) for e in entries} >= {("qllm", "w4a4"), ("rotation_lrc_gptq", "w4a4")}
    default = heldout_rule.default_value("smollm2_135m", "rotation_lrc_gptq", "w6a6", "quant.a_clip_ratio")
    assert default == 0.95  # a per-bit-width map, resolved at that activation width


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


@pytest.mark.parametrize("args, needle", [
    (["--only", "awq:w4a4"], "--only: ['awq:w4a4'] not in heldout_rule.yaml"),
    (["--rule", "/nonexistent.yaml"], "--rule=/nonexistent.yaml: no such file"),
])
def test_heldout_rule_bad_input_is_one_error_line(args, needle):
    proc = subprocess.run([sys.executable, str(RULE), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_a_sweep_merges_into_and_renders_a_results_file_of_the_oldest_format(tmp_path):
    """Rows from before extra overrides and per-window NLLs were recorded (no "overrides", a flat
    "calib_heldout_x_fp") stay beside a new sweep's rows: the merge and its table read them, marked ‡ (a sweep once
    finished its runs and then failed here, losing them)."""
    import argparse

    legacy = {"model": "smollm2_135m", "method": "rotation_lrc_gptq", "quant": "w4a4", "key": "train_lowrank.rank",
              "value": 16, "calib_heldout_x_fp": 2.2539}
    path = tmp_path / "heldout_train_lowrank_rank.json"
    path.write_text(json.dumps({"rows": [legacy]}))
    new = {"method": "qllm", "quant": "w4a4", "key": "train_lowrank.rank", "value": "4", "overrides": [], "wall_s": 9.0,
           "calib_heldout": {"variant": "cra+lrc", "ppl": 61.0, "fp": 15.8, "ratio": 3.8596, "windows": {"count": 32}}}
    args = argparse.Namespace(tiny=False, model="smollm2_135m", key="train_lowrank.rank")
    data = heldout_sweep.merge(path, [new], args)
    assert data["rows"] == [legacy, {**new, "model": "smollm2_135m"}]
    md = heldout_sweep.markdown(data)
    assert "| smollm2_135m | rotation_lrc_gptq | w4a4 | - | **16** ‡ | 2.254 | - |" in md
    assert "| smollm2_135m | qllm | w4a4 | - | **4** | 3.860 | 9 |" in md
