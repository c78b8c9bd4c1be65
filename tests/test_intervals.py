"""Paired bootstrap intervals over windows: they contain the point estimate, pairing removes what both variants share,
a real difference is a lead and noise is a tie; and every run's results carry the interval of each ratio to FP."""
import math

import pytest
import torch

from conftest import read_results, run_cli, tiny_overrides
from qllm_pipeline.evaluation.intervals import difference_interval, ratio_interval, verdict

T = 511  # tokens per window


def test_ratio_interval_contains_the_estimate_and_pairing_narrows_it():
    gen = torch.Generator().manual_seed(0)
    hardness = torch.rand(32, generator=gen) * 4 + 1  # windows differ a lot in difficulty, the same for both
    fp = (hardness * T).tolist()
    quantized = (hardness * T * 1.05 + torch.randn(32, generator=gen) * 5).tolist()  # 5 % more NLL everywhere
    lo, hi = ratio_interval(quantized, fp, T)
    estimate = math.exp((sum(quantized) - sum(fp)) / (32 * T))
    assert lo < estimate < hi and hi - lo < 0.05 * estimate
    unpaired = torch.tensor(quantized)[torch.randperm(32, generator=gen)].tolist()
    lo_u, hi_u = ratio_interval(unpaired, fp, T)  # the same values, the pairing destroyed: a much wider interval
    assert hi_u - lo_u > 5 * (hi - lo)
    assert ratio_interval(quantized, fp, T) == (lo, hi)  # seeded: reproducible


def test_a_lead_needs_an_interval_that_excludes_zero():
    gen = torch.Generator().manual_seed(1)
    base = (torch.rand(32, generator=gen) * 3 + 2) * T
    better = (base * 0.97).tolist()
    noisy = (base * (1 + torch.randn(32, generator=gen) * 0.02)).tolist()
    assert verdict(*difference_interval(better, base.tolist(), T)) == "lead"
    assert verdict(*difference_interval(base.tolist(), better, T)) == "behind"
    assert verdict(*difference_interval(noisy, base.tolist(), T)) == "tie"
    with pytest.raises(ValueError, match="at least 2 windows"):
        ratio_interval([1.0], [1.0], T)
    with pytest.raises(ValueError, match="differ in number"):
        difference_interval([1.0, 2.0], [1.0], T)


def test_results_carry_the_interval_of_each_ratio_to_fp(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run), "method=qllm"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(run)
    ppl, ci = results["ppl"]["wiki_sample"], results["ppl_ci"]["wiki_sample"]
    assert set(ci) == set(ppl) - {"fp"} == {"rtn", "cra", "cra+lrc"}
    for variant, (lo, hi) in ci.items():
        assert lo <= ppl[variant] / ppl["fp"] <= hi, variant
    assert "× FP, 95 % CI" in (run / "results.md").read_text()
    # a rerun reads the rows (and their windows' NLLs) from the cache: the same intervals
    again = tmp_path / "again"
    assert run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", again), "method=qllm"]).returncode == 0
    assert read_results(again)["ppl_ci"] == results["ppl_ci"]


def test_accuracy_table_calls_a_lead_only_outside_the_interval():
    """benchmarks/accuracy.py pairs our row with the best peer row of its bit width on the windows' NLLs."""
    from conftest import REPO, load_script

    accuracy = load_script(REPO / "benchmarks" / "accuracy.py", "accuracy_under_test")
    gen = torch.Generator().manual_seed(2)
    base = (torch.rand(32, generator=gen) * 3 + 2) * T
    peer = {"tool": "llm-compressor", "method": "quip_gptq", "quant": "w4a4", "fp": 10.0, "ppl": 20.0,
            "window_nll": base.tolist()}
    worse_peer = {**peer, "method": "gptq", "ppl": 90.0, "window_nll": (base * 1.5).tolist()}
    ours_lead = {"tool": "qllm-pipeline", "method": "best", "quant": "w4a4", "fp": 10.0, "ppl": 19.0,
                 "window_nll": (base * 0.97).tolist()}
    ours_tie = {**ours_lead, "method": "other", "window_nll": (base * (1 + torch.randn(32, generator=gen) * 0.02)).tolist()}
    md = accuracy.markdown([peer, worse_peer, ours_lead, ours_tie], "cmd")
    assert "| best | w4a4 | lead vs quip_gptq (" in md  # against the best peer row, not the worse one
    assert "| other | w4a4 | tie vs quip_gptq (" in md
    assert accuracy.against_best_peer({**ours_lead, "window_nll": []}, [peer]) == "-"  # no windows: no verdict
