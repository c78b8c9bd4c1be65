"""benchmarks/peers.py without llm-compressor: its command-line errors, the merge into accuracy.json and the report.

The llm-compressor runs themselves need their own virtual environment (see the script's docstring) and take about an
hour on 2 CPU cores, so they are not part of the test suite."""
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "peers.py"


def load_peers():
    spec = importlib.util.spec_from_file_location("peers_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def peer_row(method, quant, ppl, status="ok"):
    row = {"tool": "llm-compressor", "tool_version": "0.14.0.1", "method": method, "quant": quant, "ppl": ppl,
           "fp": 15.8, "ratio": None if ppl is None else ppl / 15.8, "seconds": 10.0, "calib": "16x512",
           "eval_windows": 32, "status": status}
    if status != "ok":
        row["error"] = "ValueError: no"
    return row


@pytest.mark.parametrize("args, needle", [
    (["--quants", "w3a3"], "unknown quant"),
    (["--recipes", "awq"], "unknown recipe"),
    (["--eval-windows", "0"], "--eval-windows=0"),
    (["--calib-samples", "-1"], "--calib-samples=-1"),
    (["--threads", "0"], "--threads=0"),
    (["--eval-windows", "many"], "invalid int value"),
    (["--merge-only"], "--merge-only needs --merge"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--model", "gpt5"], "unknown --model=gpt5; choose a conf/model entry"),
    (["--model", "gemma3_270m", "--model-path", "/nonexistent"], "--model-path=/nonexistent has no config.json"),
])
def test_bad_input_is_one_error_line(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_malformed_merge_target_is_refused(tmp_path):
    target = tmp_path / "accuracy.json"
    target.write_text('{"command": "x"}')
    proc = run_cli("--merge", str(target))
    assert proc.returncode == 2 and "accuracy.json-style" in proc.stderr and proc.stderr.count("\n") == 1


def test_upsert_keeps_other_tools_rows():
    peers = load_peers()
    ours = {"quant": "w4a4", "method": "rtn", "ppl": 1157.5, "fp": 15.5}  # our rows have no "tool" key
    other = {"tool": "other-tool", "quant": "w4a4", "method": "rtn", "ppl": 1.0}
    old = peer_row("rtn", "w4a4", 999.0)
    data = {"command": "python benchmarks/accuracy.py", "rows": [ours, old, other]}
    new_rtn, new_gptq = peer_row("rtn", "w4a4", 1200.0), peer_row("gptq", "w4a4", 900.0)
    data, replaced, added = peers.upsert_rows(data, [new_rtn, new_gptq])
    assert (replaced, added) == (1, 1)
    assert data["rows"] == [ours, new_rtn, other, new_gptq]
    assert data["command"] == "python benchmarks/accuracy.py"


def test_merge_only_upserts_successful_rows(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    rows = [peer_row("rtn", "w4a4", 1200.0), peer_row("spinquant_gptq", "w4a4", None, status="failed")]
    (out / "peers.json").write_text(json.dumps({"rows": rows}))
    target = tmp_path / "accuracy.json"
    ours = {"quant": "w4a4", "method": "rtn", "ppl": 1157.5}
    target.write_text(json.dumps({"rows": [ours, peer_row("rtn", "w4a4", 5.0)]}))
    proc = run_cli("--merge-only", "--merge", str(target), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(target.read_text())["rows"]
    assert merged == [ours, rows[0]]  # the old peer row replaced; the failed row not merged
    assert "failed rows not merged: spinquant_gptq/w4a4" in proc.stdout


def test_markdown_has_table_failures_and_total():
    peers = load_peers()
    result = {
        "tool_version": "0.14.0.1", "command": "python benchmarks/peers.py", "fp": 15.806, "fp_blockwise": 15.806,
        "versions": {"compressed-tensors": "0.19.0", "transformers": "5.17.0", "torch": "2.13.0+cpu"},
        "settings": {"calib_samples": 16, "calib_seq_len": 512, "calib_seed": 0, "eval_seq_len": 512, "eval_windows": 32,
                     "threads": 1},
        "quants": ["w4a4", "w4a8"], "recipes": ["rtn", "spinquant_gptq"], "total_wall_s": 3600.0,
        "rows": [
            {**peer_row("rtn", "w4a4", 1200.0), "eval_seconds": 80.0,
             "act_check": {"windows": 2, "ppl_quantized": 1250.0, "ppl_weights_only": 28.9}},
            peer_row("spinquant_gptq", "w4a4", None, status="failed"),
        ],
    }
    md = peers.markdown(result)
    assert "| fp | 15.81 (1.00×) | 15.81 (1.00×) |" in md
    assert "| rtn | 1200.00 (75.95×) | - |" in md
    assert "| spinquant_gptq | failed | - |" in md
    assert "failed: ValueError: no" in md
    assert "Total wall time: 60.0 min" in md and "python benchmarks/peers.py" in md


def test_rows_of_another_model_are_kept_apart(tmp_path):
    """Gemma-3 270M's rows sit beside SmolLM2's (rows without a model are SmolLM2's), in their own report files."""
    peers = load_peers()
    smol, gemma = peer_row("gptq", "w4a4", 30.0), {**peer_row("gptq", "w4a4", 40.0), "model": "gemma3_270m"}
    data, replaced, added = peers.upsert_rows({"rows": [smol]}, [gemma])
    assert (replaced, added) == (0, 1) and data["rows"] == [smol, gemma]
    newer = {**gemma, "ppl": 39.0}
    data, replaced, added = peers.upsert_rows(data, [newer])
    assert (replaced, added) == (1, 0) and data["rows"] == [smol, newer]
    assert peers.report_stem("smollm2_135m") == "peers" and peers.report_stem("gemma3_270m") == "peers-gemma3_270m"


@pytest.mark.parametrize("args, line", [
    (["nope", "out"], "error: unknown model 'nope'; choose a conf/model entry"),
    (["gemma3_270m"], "error: the following arguments are required: out"),
])
def test_save_model_bad_input_is_one_error_line(args, line, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "save_model.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line]
