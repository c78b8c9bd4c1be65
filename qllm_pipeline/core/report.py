"""Result tables: results.json and results.md in the run directory, and the same table on the console."""
from __future__ import annotations

import json
import platform
from pathlib import Path


def ppl_table(ppl: dict[str, dict[str, float]], ci: dict[str, dict[str, list[float]]] | None = None) -> list[str]:
    """Perplexity and its ratio to FP per variant and dataset, with the ratio's 95 % paired-bootstrap interval over
    the windows when the rows carry one."""
    datasets, ci = list(ppl), ci or {}
    variants = list(dict.fromkeys(v for d in datasets for v in ppl[d]))
    head = "| model | " + " | ".join(f"{d} ppl | × FP | × FP, 95 % CI" for d in datasets) + " |"
    lines = [head, "|---|" + "---:|---:|---:|" * len(datasets)]
    for v in variants:
        cells = []
        for d in datasets:
            value, fp, interval = ppl[d].get(v), ppl[d].get("fp"), ci.get(d, {}).get(v)
            cells.append("-" if value is None else f"{value:.3f}")
            cells.append("-" if value is None or not fp else f"{value / fp:.2f}")
            cells.append("-" if interval is None else f"{interval[0]:.2f} – {interval[1]:.2f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def zeroshot_table(zeroshot: dict[str, dict]) -> list[str]:
    tasks = list(dict.fromkeys(t for row in zeroshot.values() for t in row["tasks"]))
    lines = ["| model | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    for variant, row in zeroshot.items():
        cells = [f"{row['tasks'][t]['acc']:.4f}" if t in row["tasks"] else "-" for t in tasks]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {row['average_acc']:.4f} |")
    return lines


def stage_lines(stages: list[dict]) -> list[str]:
    lines = ["| stage | status | computed | cached | time (s) | peak RSS (MiB) | peak device (MiB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        lines.append(
            f"| {s['stage']} | {s['status']} | {s['computed']} | {s['cached']} | {s['seconds']:.1f} | {s['peak_rss_mib']:.0f} | {s['peak_device_mib']:.0f} |"
        )
    return lines


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(run_dir: Path, results: dict) -> str:
    """Write results.json + results.md; return the markdown."""
    meta = results.get("meta", {})
    md = [f"# qllm-pipeline results: {meta.get('model', '?')} {meta.get('quant', '?')}", ""]
    if results.get("ppl"):
        md += ["## Perplexity", "", *ppl_table(results["ppl"], results.get("ppl_ci")), "",
               "The interval: a paired bootstrap over the evaluation windows (qllm_pipeline/evaluation/intervals.py).", ""]
        if results.get("windows"):
            md += ["Windows: " + "; ".join(f"{name} {w['count']} × {w['seq_len']} tokens ({w['rule']})"
                                           for name, w in results["windows"].items()) + ".", ""]
    if results.get("zeroshot"):
        md += ["## Zero-shot accuracy (lm-eval)", "", *zeroshot_table(results["zeroshot"]), ""]
    if results.get("checkpoint"):
        c = results["checkpoint"]
        md += [f"Checkpoint ({c['format']}): {c['checkpoint_bytes'] / 1e6:.1f} MB on disk, "
               f"{c['checkpoint_bytes'] / c['fp16_bytes']:.2f}× the same model in FP16 ({c['fp16_bytes'] / 1e6:.1f} MB).", ""]
    md += ["## Stages", "", *stage_lines(results["stages"]), ""]
    cpu = f" (CPU kernels: {meta['cpu_capability']})" if meta.get("cpu_capability") else ""
    if meta.get("cpu_model"):
        cpu += f" on {meta['cpu_model']}, {meta.get('threads', '?')} threads"
    ranks = f"; {meta['ranks']} data-parallel ranks" if meta.get("ranks", 1) > 1 else ""
    md += [f"Total wall time: {meta.get('wall_seconds', 0):.1f} s; peak RSS {meta.get('peak_rss_mib', 0):.0f} MiB; "
           f"device {meta.get('device', '?')}{cpu}{ranks}.", ""]
    text = "\n".join(md)
    (run_dir / "results.md").write_text(text)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return text
