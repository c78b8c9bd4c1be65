"""benchmarks/peers.py without llm-compressor: its command-line errors, the merge into accuracy.json and the report.

The llm-compressor runs themselves need their own virtual environment (see the script's docstring) and take about an
hour on 2 CPU cores, so they are not part of the test suite."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, load_script, tiny_model

SCRIPT = REPO / "benchmarks" / "peers.py"


def load_peers():
    return load_script(SCRIPT, "peers_under_test")


def load_report():
    load_peers()  # puts benchmarks/ on sys.path
    import peers_report

    return peers_report


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


FP = {"wiki_sample": 15.8, "lee_news": 21.4}
WINDOWS = {"wiki_sample": {"count": 32, "seq_len": 512, "rule": "spread over documents v1"},
           "lee_news": {"count": 20, "seq_len": 512, "rule": "spread over documents v1"}}


def peer_row(method, quant, ppl, status="ok", dataset=None):
    """A peers row; without `dataset`, one written before rows named their corpus (wiki_sample's)."""
    fp = FP[dataset or "wiki_sample"]
    row = {"tool": "llm-compressor", "tool_version": "0.14.0.1", "method": method, "quant": quant, "ppl": ppl,
           "fp": fp, "ratio": None if ppl is None else ppl / fp, "seconds": 10.0, "calib": "16x512",
           "eval_windows": 32, "status": status}
    if dataset:
        row.update(dataset=dataset, windows=WINDOWS[dataset], eval_windows=WINDOWS[dataset]["count"])
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
    (["--corpora", "wiki_sample,nope"], "unknown corpus(es) ['nope']; choose from ['wiki_sample', 'lee_news'"),
    (["--corpora", "text_files"], "unknown corpus(es) ['text_files']"),  # needs file paths this script has no options for
    (["--corpora", "lee_news,wiki_sample,lee_news"], "--quants, --recipes and --corpora must not repeat an entry"),
    (["--corpora", " , "], "--corpora is empty"),
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
    merging = load_report()
    ours = {"quant": "w4a4", "method": "rtn", "ppl": 1157.5, "fp": 15.5}  # our rows have no "tool" key
    other = {"tool": "other-tool", "quant": "w4a4", "method": "rtn", "ppl": 1.0}
    old = peer_row("rtn", "w4a4", 999.0)
    data = {"command": "python benchmarks/accuracy.py", "rows": [ours, old, other]}
    new_rtn, new_gptq = peer_row("rtn", "w4a4", 1200.0), peer_row("gptq", "w4a4", 900.0)
    data, replaced, added = merging.upsert_rows(data, [new_rtn, new_gptq])
    assert (replaced, added) == (1, 1)
    assert data["rows"] == [ours, new_rtn, other, new_gptq]
    assert data["command"] == "python benchmarks/accuracy.py"


def test_merge_only_upserts_successful_rows(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    rows = [peer_row("rtn", "w4a4", 1200.0, dataset="wiki_sample"), peer_row("rtn", "w4a4", 1500.0, dataset="lee_news"),
            *(peer_row("spinquant_gptq", "w4a4", None, status="failed", dataset=d) for d in FP)]
    (out / "peers.json").write_text(json.dumps({"rows": rows}))
    target = tmp_path / "accuracy.json"
    ours = {"quant": "w4a4", "method": "rtn", "ppl": 1157.5}
    target.write_text(json.dumps({"rows": [ours, peer_row("rtn", "w4a4", 5.0)]}))
    proc = run_cli("--merge-only", "--merge", str(target), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(target.read_text())["rows"]
    # the old peer row (no dataset: wiki_sample's) replaced by the wiki_sample row, the lee_news row added beside it;
    # the failed run not merged, and named once for its two corpora
    assert merged == [ours, rows[0], rows[1]]
    assert "1 row(s) replaced, 1 added; failed rows not merged: spinquant_gptq/w4a4\n" in proc.stdout


def test_rows_of_another_corpus_are_kept_apart():
    """A lee_news row and a wiki_sample row of the same recipe and quant both survive a merge; each replaces only its
    own corpus's row (a row without a dataset is wiki_sample's)."""
    merging = load_report()
    old_wiki, old_lee = peer_row("gptq", "w4a4", 30.0), peer_row("gptq", "w4a4", 45.0, dataset="lee_news")
    wiki, lee = peer_row("gptq", "w4a4", 29.0, dataset="wiki_sample"), peer_row("gptq", "w4a4", 44.0, dataset="lee_news")
    data, replaced, added = merging.upsert_rows({"rows": [old_wiki]}, [wiki, lee])
    assert (replaced, added) == (1, 1) and data["rows"] == [wiki, lee]
    data, replaced, added = merging.upsert_rows({"rows": [old_wiki, old_lee]}, [lee])
    assert (replaced, added) == (1, 0) and data["rows"] == [old_wiki, lee]


def test_each_corpus_row_is_against_its_own_fp():
    """One run's rows: ppl, × FP and the interval against that corpus's FP windows; the activation check on the
    first corpus's row only; a failed run fails the row of every corpus."""
    peers = load_peers()
    fp_nll = {"wiki_sample": [1500.0, 1400.0, 1450.0], "lee_news": [1600.0, 1650.0, 1550.0]}
    windows = {d: {"count": 3, "seq_len": 512, "rule": "spread over documents v1"} for d in fp_nll}
    result = {"fp": {d: math.exp(sum(n) / (3 * 511)) for d, n in fp_nll.items()}, "fp_window_nll": fp_nll, "windows": windows}
    nlls = {"wiki_sample": [(n + 100.0, 511) for n in fp_nll["wiki_sample"]], "lee_news": [(n + 300.0, 511) for n in fp_nll["lee_news"]]}
    check = {"dataset": "wiki_sample", "windows": 2, "ppl_quantized": 20.0, "ppl_weights_only": 17.0}
    out = {"nlls": nlls, "seconds": 5.0, "eval_seconds": {"wiki_sample": 3.0, "lee_news": 2.0}, "act_check": check}
    base = {"tool": "llm-compressor", "method": "rtn", "quant": "w8a8"}
    wiki, lee = (peers.ok_row(base, d, out, result) for d in ("wiki_sample", "lee_news"))
    for row, extra in ((wiki, 100.0), (lee, 300.0)):
        assert row["fp"] == result["fp"][row["dataset"]] and row["windows"] == windows[row["dataset"]]
        assert row["ratio"] == pytest.approx(math.exp(extra / 511))  # every window's NLL up by `extra`
        assert row["ci_low"] == pytest.approx(row["ratio"]) == pytest.approx(row["ci_high"])  # a constant shift
        assert row["window_nll"] == [n for n, _ in nlls[row["dataset"]]] and row["seconds"] == 5.0
    assert wiki["eval_seconds"] == 3.0 and lee["eval_seconds"] == 2.0
    assert wiki["act_check"] == check and "act_check" not in lee
    failed = peers.failed_row(base, "lee_news", "ValueError: no", result)
    assert failed["status"] == "failed" and failed["dataset"] == "lee_news" and failed["fp"] == result["fp"]["lee_news"]


def report(**changes):
    result = {
        "tool_version": "0.14.0.1", "command": "python benchmarks/peers.py", "corpora": ["wiki_sample", "lee_news"],
        "fp": dict(FP), "fp_blockwise": {"wiki_sample": 15.801, "lee_news": 21.402}, "windows": WINDOWS,
        "versions": {"compressed-tensors": "0.19.0", "transformers": "5.17.0", "torch": "2.13.0+cpu"},
        "settings": {"calib_samples": 16, "calib_seq_len": 512, "calib_seed": 0, "eval_seq_len": 512, "eval_windows": 32,
                     "threads": 1},
        "quants": ["w4a4", "w4a8"], "recipes": ["rtn", "spinquant_gptq"], "total_wall_s": 3600.0,
        "rows": [
            {**peer_row("rtn", "w4a4", 1264.0, dataset="wiki_sample"), "eval_seconds": 80.0,
             "act_check": {"dataset": "wiki_sample", "windows": 2, "ppl_quantized": 1250.0, "ppl_weights_only": 28.9}},
            {**peer_row("rtn", "w4a4", 107.0, dataset="lee_news"), "eval_seconds": 50.0},
            *(peer_row("spinquant_gptq", "w4a4", None, status="failed", dataset=d) for d in FP),
        ],
    }
    return {**result, **changes}


def test_markdown_has_a_table_per_corpus_failures_and_total():
    peers = load_peers()
    md = peers.markdown(report())
    wiki, lee = md.index("## wiki_sample (32 × 512 tokens, spread over documents v1)"), md.index("## lee_news (20 × 512 tokens")
    every = md.index("## Every run")
    assert wiki < lee < every and md.count("| method | w4a4 | w4a8 |") == 2
    wiki_table, lee_table = md[wiki:lee], md[lee:every]
    assert "| fp | 15.80 (1.00×) | 15.80 (1.00×) |" in wiki_table and "| rtn | 1264.00 (80.00×) | - |" in wiki_table
    assert "| fp | 21.40 (1.00×) | 21.40 (1.00×) |" in lee_table and "| rtn | 107.00 (5.00×) | - |" in lee_table
    assert "block-by-block `qllm_pipeline.evaluation.perplexity` on the same windows: 21.402" in lee_table
    assert "| spinquant_gptq | failed | - |" in wiki_table and "| spinquant_gptq | failed | - |" in lee_table
    assert "spread over the corpus's held-out documents" in md and "the first 32 windows" not in md
    # every run: a line per corpus, the activation check on the first corpus's line only
    assert "| w4a4 | rtn | wiki_sample | ok | 1264.000 | 80.00 | 10.0 | 80.0 | 1250.00 | 28.90 |" in md
    assert "| w4a4 | rtn | lee_news | ok | 107.000 | 5.00 | 10.0 | 50.0 | - | - |" in md
    assert "| w4a4 | spinquant_gptq | lee_news | failed: ValueError: no |" in md
    assert "Total wall time: 60.0 min" in md and "python benchmarks/peers.py" in md


def test_markdown_counts_runs_not_rows_while_partial():
    md = load_peers().markdown(report(total_wall_s=None))
    assert "Partial results: 2 of 4 runs finished so far." in md  # 4 rows: 2 runs on 2 corpora


def test_markdown_reads_a_single_corpus_report():
    """A peers.json from before --corpora: one FP number (wiki_sample's), rows without a dataset, the first windows."""
    old = report(fp=15.806, fp_blockwise=15.806, rows=[{**peer_row("rtn", "w4a4", 1200.0), "eval_seconds": 80.0}])
    del old["corpora"], old["windows"]
    md = load_peers().markdown(old)
    assert "## wiki_sample (the first 32 windows of 512 tokens)" in md and "## lee_news" not in md
    assert "| fp | 15.81 (1.00×) | 15.81 (1.00×) |" in md and "| rtn | 1200.00 (75.95×) | - |" in md


def test_rows_of_another_model_are_kept_apart(tmp_path):
    """Gemma-3 270M's rows sit beside SmolLM2's (rows without a model are SmolLM2's), in their own report files."""
    peers, merging = load_peers(), load_report()
    smol, gemma = peer_row("gptq", "w4a4", 30.0), {**peer_row("gptq", "w4a4", 40.0), "model": "gemma3_270m"}
    data, replaced, added = merging.upsert_rows({"rows": [smol]}, [gemma])
    assert (replaced, added) == (0, 1) and data["rows"] == [smol, gemma]
    newer = {**gemma, "ppl": 39.0}
    data, replaced, added = merging.upsert_rows(data, [newer])
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


class FailingTokenizer:
    def save_pretrained(self, directory):
        raise OSError("disk went away")


def test_save_model_writes_all_or_nothing(tmp_path):
    """A save that fails after the weights are written leaves no `out` and no temporary folder (accuracy_all takes an
    `out` with a config.json as finished); a save that succeeds fills an empty `out` with a model that loads the same."""
    import torch
    from transformers import AutoModelForCausalLM

    save_whole, model = load_script(REPO / "benchmarks" / "save_model.py", "save_model_under_test").save_whole, tiny_model(layers=1)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="disk went away"):
        save_whole(model, FailingTokenizer(), out)
    assert list(tmp_path.iterdir()) == []

    class TokenizerFile:
        def save_pretrained(self, directory):
            (directory / "tokenizer.json").write_text("{}")

    out.mkdir()  # an empty folder is taken, as the error line's check allows
    save_whole(model, TokenizerFile(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(8)[None]
    assert torch.equal(again(ids).logits, model(ids).logits)
