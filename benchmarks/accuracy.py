"""Accuracy benchmark: our methods at several bit widths, beside the peers' rows (benchmarks/peers.py) in one table.

One invocation runs one Hydra multirun of the ordinary pipeline per bit width (`python -m qllm_pipeline -m quant=...
method=...`), so every method runs through the same quantizers, calibration windows and evaluation windows, in one
process (the model is loaded once). Each invocation starts from an empty artifact cache (a temporary directory unless
--cache is given), so the stage times are compute times. `--attn-methods` adds rows with the attention inputs
(Q, K, V) quantized at the activation bit width (`quant.attn_bits`, the papers' "KV" setting); the other rows keep
them at 16 bits.

Results are merged into benchmarks/results/accuracy.json (rows keyed by tool, model, method, quant; rows of other
tools, e.g. llm-compressor's from benchmarks/peers.py, are kept; rows without a model are SmolLM2's) and accuracy.md
is rewritten from all rows, one table per model.

    python benchmarks/accuracy.py --quants w4a4 --methods rtn,gptq,qllm,rotation,quarot,rotation_lrc_gptq,rotation_qllm_gptq
    python benchmarks/accuracy.py --quants w4a8,w6a6 --methods qllm,rotation_qllm_gptq --attn-methods rotation_qllm_gptq
    python benchmarks/accuracy.py --model gemma3_270m --methods rotation_lrc_gptq rotate.residual=false
    python benchmarks/accuracy.py --tiny --tiny-model-dir DIR --out DIR   # smoke mode used by the tests
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _cli import TINY_OVERRIDES, add_run_options, code_commit, rows_in, tiny_model  # noqa: E402
from qllm_pipeline.evaluation.intervals import difference_interval, verdict  # noqa: E402
from qllm_pipeline.quantized.quantizer import ACTIVATION_QUANTIZER_VERSION  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HELDOUT = "calib_heldout"
TOOL = "qllm-pipeline"
DEFAULT_MODEL = "smollm2_135m"  # the model of rows written before rows named theirs
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
QUANTS = sorted(p.stem for p in (REPO / "conf" / "quant").glob("*.yaml"))
# The default job's settings (the exported model too: its size goes in the row), evaluated on both corpora's evaluation
# windows, calibrated on wiki_sample; every run is also evaluated on held-out calibration windows (calib_heldout), on
# which the best recipe is chosen: never on the evaluation windows.
EVAL_DATASETS = ("wiki_sample", "lee_news")
BENCH_OVERRIDES = ["pipeline.progress=false", f"eval.datasets=[{','.join(EVAL_DATASETS)},calib_heldout]"]


def abits(quant: str) -> int | None:
    from qllm_pipeline.core.config import group_config

    return group_config("quant", quant, REPO / "conf")["abits"]


def sweep(args, quant: str, methods: list[str], extra: list[str], cache: Path, sweep_dir: Path) -> list[dict]:
    cmd = [
        sys.executable, "-m", "qllm_pipeline", "-m", f"quant={quant}", f"method={','.join(methods)}", f"model={args.model}",
        f"pipeline.cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}", *BENCH_OVERRIDES, *args.overrides, *extra,
    ]
    print("[accuracy] " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: the benchmark sweep failed (exit {proc.returncode}); see the log above")
    runs = []
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        results = json.loads(results_file.read_text())
        choice = dict(o.split("=", 1) for o in results["meta"]["overrides"] if o.split("=", 1)[0] == "method")
        runs.append({"quant": quant, "method": choice["method"], "extra": extra, "results": results,
                     "model": "tiny" if args.tiny else args.model, "overrides": [] if args.tiny else list(args.overrides)})
    return runs


def own_row(ppl: dict) -> str:
    """The run's own variant among its rows: not fp, and not the rtn / cra reference rows unless it is one of them."""
    names = [n for n in ppl if n != "fp"]
    for reference in ("rtn", "cra"):
        if len(names) > 1 and reference in names:
            names.remove(reference)
    return names[0]


def rows_from(run: dict, tag: str = "") -> list[dict]:
    """Our rows of one run: one per evaluation corpus (EVAL_DATASETS' order first; results.json sorts its keys)."""
    datasets = [d for d in run["results"]["ppl"] if d != HELDOUT]
    order = {d: i for i, d in enumerate(EVAL_DATASETS)}
    return [row_from(run, d, tag) for d in sorted(datasets, key=lambda d: (order.get(d, len(order)), d))]


def row_from(run: dict, dataset: str, tag: str = "") -> dict:
    """Our row of one run on one corpus's evaluation windows; `dev` holds the ratio to FP on the held-out calibration
    windows (calib_heldout), the windows the best recipe is chosen on."""
    results = run["results"]
    ppl = results["ppl"][dataset]
    label = own_row(ppl)
    dev = {name: other[label] / other["fp"] for name, other in results["ppl"].items() if name == HELDOUT}
    checkpoint = results.get("checkpoint") or {}
    attn = next((int(o.split("=")[1]) for o in run["extra"] if o.startswith("quant.attn_bits=")), None)
    return {
        "tool": TOOL,
        "model": run["model"],
        "method": label + (f" [{tag}]" if tag else "") + (f" (attn A{attn})" if attn else ""),
        "config": " ".join([f"method={run['method']}", *run.get("overrides", []), *run["extra"]]),
        "quant": run["quant"],
        "attn_bits": attn,
        "dataset": dataset,
        "windows": results.get("windows", {}).get(dataset),  # how many, how long, chosen by which rule
        "ppl": ppl[label],
        "fp": ppl["fp"],
        # the 95 % paired-bootstrap interval of ppl / fp over the evaluation windows (qllm_pipeline/evaluation/intervals.py)
        **dict(zip(("ci_low", "ci_high"), results.get("ppl_ci", {}).get(dataset, {}).get(label, ()))),
        **({"window_nll": results["window_nll"][dataset][label]} if "window_nll" in results else {}),
        "rtn": ppl["rtn"],
        "dev_ratio": dev,
        "wall_s": round(results["meta"]["wall_seconds"], 1),
        "stages": {s["stage"]: {"seconds": s["seconds"], "peak_rss_mib": s["peak_rss_mib"]}
                   for s in results["stages"] if s["computed"]},
        "commit": code_commit(),
        "act_quantizer": ACTIVATION_QUANTIZER_VERSION,
        "cpu_capability": results["meta"].get("cpu_capability"),  # quantized numbers move with the CPU's kernels
        "cpu_model": results["meta"].get("cpu_model"),  # ... with the CPU itself and the thread count
        "threads": results["meta"].get("threads"),
        # the written checkpoint's size on disk (fuse.format, fuse.export_dtype) and the same model's in FP16
        **{k: checkpoint[k] for k in ("checkpoint_bytes", "fp16_bytes", "format", "dtype") if k in checkpoint},
    }


def earlier_quantizer(row: dict) -> bool:
    """Our row measured with an earlier activation quantizer (rows before versions were recorded: version 1)."""
    return row.get("tool", TOOL) == TOOL and row.get("act_quantizer", 1) != ACTIVATION_QUANTIZER_VERSION


def model_of(row: dict) -> str:
    return row.get("model", DEFAULT_MODEL)


def dataset_of(row: dict) -> str:
    return row.get("dataset") or "wiki_sample"  # rows written before rows named theirs


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """Upsert `rows` into the json file's rows, keyed by (tool, model, dataset, method, quant); other rows are kept in
    order."""
    old = rows_in(path)
    key = lambda r: (r.get("tool", TOOL), model_of(r), dataset_of(r), r["method"], r["quant"])  # noqa: E731
    new = {key(r): r for r in rows}
    kept = [r for r in old if key(r) not in new and "tool" in r]  # rows without a tool predate this format
    return kept + rows


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Accuracy: perplexity on the evaluation windows (32 × 512 tokens)", "",
             f"Last command: `{command}`. Cells are ppl (× FP, and its 95 % paired-bootstrap interval over the windows where the "
             "row has one). Attention inputs stay 16-bit unless the method says "
             "`attn A<n>`. One table per model and evaluation corpus; every row is calibrated on wiki_sample."]
    for model, dataset in dict.fromkeys((model_of(r), dataset_of(r)) for r in rows):
        table = [r for r in rows if model_of(r) == model and dataset_of(r) == dataset]
        windows = next((r["windows"] for r in table if r.get("windows")), None)
        how = (f"{windows['count']} × {windows['seq_len']} tokens, {windows['rule']}" if windows
               else "the first 32 × 512 tokens of the text (rows before windows were spread over the documents)")
        lines += ["", f"## {model}: {dataset} ({how})", "", *model_table(table)]
    if any(earlier_quantizer(r) for r in rows):
        lines += ["", f"† measured with an earlier activation quantizer (before version {ACTIVATION_QUANTIZER_VERSION}, "
                  "compressed-tensors' arithmetic: qllm_pipeline/quantized/quantizer.py); not re-run since. The change is in the "
                  "asymmetric activation quantizer only: `[symmetric]` rows would give the same numbers."]
    ours = [r for r in rows if r.get("tool", TOOL) == TOOL and r.get("stages")]
    lines += ["", "## Our runs: held-out calibration windows (× FP, what settings are chosen on) and cost of every stage", "",
              "| model | quant | method | config | calib_heldout × FP | checkpoint (× FP16) | wall (s) | stages: s / MiB |",
              "|---|---|---|---|---|---:|---:|---|"]
    for r in ours:
        if dataset_of(r) != EVAL_DATASETS[0] and any(dataset_of(o) == EVAL_DATASETS[0] and o["config"] == r["config"]
                                                     and o["quant"] == r["quant"] for o in ours):
            continue  # the run's other corpus: the same run, listed once
        stages = ", ".join(f"{k} {v['seconds']:.0f} s / {v['peak_rss_mib']:.0f}" for k, v in r["stages"].items())
        dev = ", ".join(f"{v:.3f}" for v in r.get("dev_ratio", {}).values()) or "-"
        wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
        mark = " †" if earlier_quantizer(r) else ""
        size = (f"{r['checkpoint_bytes'] / 1e6:.1f} MB ({r['checkpoint_bytes'] / r['fp16_bytes']:.2f}×)"
                if r.get("checkpoint_bytes") else "-")
        lines.append(f"| {model_of(r)} | {r['quant']} | {r['method']}{mark} | `{r['config']}` | {dev} | {size} | {wall} | "
                     f"{stages} |")
    return "\n".join(lines) + "\n"


def ppl_cell(row: dict) -> str:
    """ppl (× FP), with the ratio's 95 % interval when the row has one."""
    ratio = row["ppl"] / row["fp"]
    interval = f", {row['ci_low']:.2f}–{row['ci_high']:.2f}" if "ci_low" in row else ""
    return f"{row['ppl']:.2f} ({ratio:.2f}×{interval})"


def against_best_peer(row: dict, rows: list[dict]) -> str:
    """Our row against the other tool's best row at its bit width, paired on the evaluation windows: "lead",
    "behind" or "tie" by the 95 % interval of the perplexity difference (a lead inside it is a tie)."""
    peers = [r for r in rows if r.get("tool", TOOL) != TOOL and r["quant"] == row["quant"] and r.get("ppl")
             and dataset_of(r) == dataset_of(row)
             and len(r.get("window_nll", [])) == len(row.get("window_nll", [])) > 1]
    if not peers:
        return "-"
    best = min(peers, key=lambda r: r["ppl"])
    low, high = difference_interval(row["window_nll"], best["window_nll"], best.get("tokens_per_window", 511))
    return f"{verdict(low, high)} vs {best['method']} ({low:+.2f} to {high:+.2f})"


def model_table(rows: list[dict]) -> list[str]:
    """One model's rows: a column per bit width, the FP row first."""
    quants = [q for q in ("w4a4", "w4a8", "w6a6", "w8a8") if any(r["quant"] == q for r in rows)]
    quants += sorted({r["quant"] for r in rows} - set(quants))
    fp = {r["quant"]: r["fp"] for r in rows}
    cell = {(r.get("tool", TOOL), r["method"], r["quant"]): r for r in rows}
    names = list(dict.fromkeys((r.get("tool", TOOL), r["method"]) for r in rows))
    lines = ["| tool | method | " + " | ".join(quants) + " |", "|---|---|" + "---:|" * len(quants),
             "| - | fp | " + " | ".join(f"{fp[q]:.2f} (1.00×)" for q in quants) + " |"]
    for tool, method in names:
        cells = [ppl_cell(cell[tool, method, q]) if (tool, method, q) in cell else "-" for q in quants]
        mark = " †" if any(earlier_quantizer(cell[tool, method, q]) for q in quants if (tool, method, q) in cell) else ""
        lines.append(f"| {tool} | {method}{mark} | " + " | ".join(cells) + " |")
    paired = [(r, against_best_peer(r, rows)) for r in rows if r.get("tool", TOOL) == TOOL]
    paired = [(r, v) for r, v in paired if v != "-"]
    if paired:
        lines += ["", "Against the best peer row, paired on the windows (95 % interval of ppl ours − theirs):", "",
                  "| method | quant | verdict |", "|---|---|---|",
                  *[f"| {r['method']} | {r['quant']} | {v} |" for r, v in paired]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="w4a4,w4a8,w6a6", help="conf/quant options, comma-separated")
    parser.add_argument("--methods", default="rtn,qllm,quarot,rotation_qllm_gptq", help=f"conf/method options: {','.join(METHODS)}")
    parser.add_argument("--attn-methods", default="", help="methods to run again with the attention inputs quantized")
    parser.add_argument("--tag", default="", help="appended to this invocation's method names, e.g. for a setting variant")
    parser.add_argument("--model", default="smollm2_135m")
    add_run_options(parser, REPO / "benchmarks" / "results")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.quants, args.methods = args.quants.split(","), [m for m in args.methods.split(",") if m]
    attn_methods = [m for m in args.attn_methods.split(",") if m]
    for kind, names, known in (("method", args.methods + attn_methods, METHODS), ("quant", args.quants, QUANTS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"error: unknown {kind}(s) {unknown}; choose from {known}")
    if not args.methods and not attn_methods:
        raise SystemExit("error: nothing to run: give --methods and/or --attn-methods")
    if attn_methods and any(abits(q) is None for q in args.quants):
        raise SystemExit("error: --attn-methods needs quants with activation bits (not fp16)")
    command = " ".join(["python benchmarks/accuracy.py", *sys.argv[1:]])
    if args.tiny:
        if not args.tiny_model_dir:
            raise SystemExit("error: --tiny needs --tiny-model-dir (a saved tiny LLaMA)")
        args.overrides = [*tiny_model(args.tiny_model_dir), *TINY_OVERRIDES, *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    # One invocation per results folder at a time: each one clears its run folder and merges into accuracy.json.
    from filelock import FileLock, Timeout

    lock = FileLock(str(args.out / ".accuracy.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SystemExit(f"error: another benchmarks/accuracy.py is writing to {args.out}; wait for it to finish "
                         "or give this one its own --out") from None
    runs = []
    with tempfile.TemporaryDirectory(prefix="qllm-bench-") as tmp:  # the lock is held until the process exits
        cache = args.cache or Path(tmp) / "cache"
        root = args.out / "runs" / ("tiny" if args.tiny else "sweep")
        shutil.rmtree(root, ignore_errors=True)  # runs of an earlier invocation must not mix into this table
        started = time.perf_counter()
        for quant in args.quants:
            if args.methods:  # empty with --methods "": only the attention-quantized rows
                runs += sweep(args, quant, args.methods, [], cache, root / quant)
            if attn_methods:
                runs += sweep(args, quant, attn_methods, [f"quant.attn_bits={abits(quant)}"], cache, root / f"{quant}-attn")
        total_s = time.perf_counter() - started
        rows = merge(args.out / "accuracy.json", [row for r in runs for row in rows_from(r, args.tag)])
        (args.out / "accuracy.json").write_text(json.dumps({"command": command, "total_wall_s": round(total_s, 1), "rows": rows},
                                                           indent=2))
        text = markdown(rows, command) + f"\nWall time of the last invocation: {total_s / 60:.1f} min.\n"
        (args.out / "accuracy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
