"""The memory plan of every method in conf/method for the LLaMA-2 sizes and every other family's entry, at W4A4 with the paper's calibration
(128 × 2048), on one GPU: device and host peaks and the stage that sets each (no weights read; seconds).

    python benchmarks/plan_table.py
Writes benchmarks/results/plan_table.md and .json (--out elsewhere).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import Parser, code_commit, run_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = ("llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "mistral_7b", "qwen2_5_7b", "qwen3_8b", "gemma3_270m")
# Gemma-3's residual rotation is refused (it cannot pass the post norms): its rotation methods run without it.
MODEL_OVERRIDES = {"gemma3_270m": ["rotate.residual=false"]}
OVERRIDES = ["quant=w4a4", "calibrate.n_samples=128", "calibrate.seq_len=2048", "pipeline.device=cuda"]
GIB = 2**30


def parse(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args(argv)


def run(args) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qllm_pipeline.core.plan import GPU_BYTES, HOST_BUDGET_BYTES, run_plan

    methods = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    rows = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for model in MODELS:
            for method in methods:
                cfg = OmegaConf.to_container(compose("config", overrides=[f"model={model}", f"method={method}", *OVERRIDES,
                                                                         *MODEL_OVERRIDES.get(model, [])]),
                                             resolve=False)
                plan = run_plan(cfg, dict(cfg["model"]["arch"]), "cuda", host_budget=HOST_BUDGET_BYTES)
                work, host = plan["stage_working_sets"], plan["host_per_stage"]
                rows.append({"model": model, "method": method, "device_gib": round(plan["device_peak_bytes"] / GIB, 1),
                             "device_stage": max(work, key=work.get), "host_gib": round(plan["host_peak_bytes"] / GIB, 1),
                             "host_stage": max(host, key=host.get),
                             "fits": plan["device_peak_bytes"] <= GPU_BYTES and plan["host_peak_bytes"] <= HOST_BUDGET_BYTES})
    return {"command": "python benchmarks/plan_table.py", "overrides": OVERRIDES, "commit": code_commit(), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["# Memory plan of every method at W4A4, 128 × 2048 calibration tokens, one GPU", "",
             f"Command: `{result['command']}` (commit {result['commit']}; `pipeline.plan_only=true` gives the same numbers "
             f"per run). Overrides: `{' '.join(result['overrides'])}`. Fits: device ≤ 80 GB and host ≤ 32 GB.", "",
             "| model | method | device peak (GiB) | at | host peak (GiB) | at | fits |", "|---|---|---:|---|---:|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['device_gib']:.1f} | {r['device_stage']} | {r['host_gib']:.1f} | "
              f"{r['host_stage']} | {'yes' if r['fits'] else 'NO'} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_benchmark("plan_table", parse, run, markdown)
