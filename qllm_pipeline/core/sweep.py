"""Hydra callback: after a multirun, one summary table (a row per job: its overrides, metrics and cache use)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


def collect_jobs(sweep_dir: Path) -> list[dict]:
    rows = []
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0):
        results = json.loads(results_file.read_text())
        row = {"job": results_file.parent.name, "overrides": results["meta"].get("overrides", [])}
        for dataset, variants in results.get("ppl", {}).items():
            for variant, value in variants.items():
                row[f"{dataset}/{variant}"] = value
        row["cache_hits"] = [s["stage"] for s in results["stages"] if s["computed"] == 0 and s["cached"] > 0]
        row["wall_s"] = round(results["meta"]["wall_seconds"], 1)
        rows.append(row)
    return rows


def summary_markdown(rows: list[dict]) -> str:
    metrics = list(dict.fromkeys(k for r in rows for k in r if "/" in k))
    lines = ["| job | overrides | " + " | ".join(metrics) + " | stages from cache | wall (s) |",
             "|---|---|" + "---:|" * len(metrics) + "---|---:|"]
    for r in rows:
        cells = [f"{r[m]:.3f}" if m in r else "-" for m in metrics]
        lines.append(f"| {r['job']} | {' '.join(r['overrides'])} | " + " | ".join(cells)
                     + f" | {', '.join(r['cache_hits']) or '-'} | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_jobs(sweep_dir)
        if not rows:
            return
        text = "# Sweep summary\n\n" + summary_markdown(rows)
        (sweep_dir / "sweep_summary.md").write_text(text)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2))
        print(text)
        log.info("sweep summary written to %s", sweep_dir / "sweep_summary.md")
