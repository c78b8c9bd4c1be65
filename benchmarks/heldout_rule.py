"""Held-out rule: every tuned default of the default job and the best recipe chosen again by one rule.

For each entry of the rule file (benchmarks/heldout_rule.yaml: model, method, bit width, and per tuned key the values
to compare), each key is swept alone with `heldout_sweep.py` (every other key at its default; the current default
always competes), evaluated on `calib_heldout` only, the held-out calibration windows. The rule: the value with the
lowest ratio to FP replaces the default only when the paired 95 % bootstrap interval of ppl(value) − ppl(default),
on the same windows, lies below zero; otherwise the default stays (a tie is no reason to change). No evaluation
window is evaluated, so no evaluation number is printed while the defaults are chosen.

    python benchmarks/heldout_rule.py                                   # every entry (hours on a 2-core CPU)
    python benchmarks/heldout_rule.py --only qllm:w4a4                  # one entry
    python benchmarks/heldout_rule.py --tiny --tiny-model-dir DIR --rule FILE --out DIR   # smoke mode (the tests)

Writes <out>/heldout_rule.{md,json} (the candidates' table and the verdicts, keeping other entries' rows) and, per
key, the usual heldout_<key>.{md,json} under <out>/heldout_rule/ (apart from the earlier hand-run sweeps' files of
the same names, which the README quotes). All sweeps of one entry share one artifact cache, so the stages a key does
not touch are computed once.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
import heldout_sweep  # noqa: E402

from _cli import CliError, Parser, add_run_options, code_commit, logger, run_benchmark  # noqa: E402
from qllm_pipeline.evaluation.intervals import difference_interval  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHOOSE_BY = heldout_sweep.CHOOSE_BY
log = logger("heldout_rule")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", type=Path, default=REPO / "benchmarks" / "heldout_rule.yaml",
                        help="the rule file: entries of model, method, quant and sweeps {key: [values]}")
    parser.add_argument("--only", default="", help="METHOD:QUANT entries to run, comma-separated (default: all)")
    add_run_options(parser, REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.entries = load_rule(args.rule)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        known = [f"{e['method']}:{e['quant']}" for e in args.entries]
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise CliError(f"--only: {unknown} not in {args.rule.name}; its entries are {', '.join(known)}")
        args.entries = [e for e in args.entries if f"{e['method']}:{e['quant']}" in wanted]
    if args.tiny and not (args.tiny_model_dir and (args.tiny_model_dir / "config.json").is_file()):
        raise CliError("--tiny needs --tiny-model-dir, a saved tiny LLaMA (a directory with config.json)")
    return args


def load_rule(path: Path) -> list[dict]:
    if not path.is_file():
        raise CliError(f"--rule={path}: no such file")
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not entries:
        raise CliError(f"{path.name}: expected a list of entries (model, method, quant, sweeps)")
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"model", "method", "quant", "sweeps"} or not e["sweeps"]:
            raise CliError(f"{path.name}: an entry must have exactly model, method, quant and sweeps; got {e}")
        for group in ("model", "method", "quant"):
            if not (REPO / "conf" / group / f"{e[group]}.yaml").is_file():
                raise CliError(f"{path.name}: {group}={e[group]} is not a conf/{group} option")
        for key, values in e["sweeps"].items():
            if not isinstance(values, list) or not values:
                raise CliError(f"{path.name}: {e['method']}:{e['quant']} {key} needs a list of values")
    return entries


def default_value(model: str, method: str, quant: str, key: str):
    """The key's value in the composed configuration of that model, recipe and bit width (a per-bit-width map
    resolved at that bit width): what the pipeline runs when the key is not given."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qllm_pipeline.core.config import SECTIONS  # registers the schemas compose() needs
    from qllm_pipeline.quantized.quantizer import per_bit_width

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"model={model}", f"method={method}", f"quant={quant}"])
    value = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    section, _, name = key.partition(".")
    field = next((f for f in SECTIONS[section].__dataclass_fields__.values() if f.name == name), None)
    kind = field.metadata.get("range", {}).get("per_bit_width") if field is not None else None
    if kind and isinstance(value, dict):
        value = per_bit_width(value, cfg.quant.wbits if kind == "weight" else cfg.quant.abits, default=None)
    return value


def same_value(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == str(b).lower()


def decide(rows: list[dict], default) -> dict:
    """The rule applied to one key's rows (one per value, each with its calib_heldout window NLLs): the held-out
    best value, its paired interval against the default's row, and what the rule keeps."""
    base = next(r for r in rows if same_value(r["value"], default))
    best = min(rows, key=lambda r: r[CHOOSE_BY]["ratio"])
    verdict = {"default": str(default), "default_ratio": base[CHOOSE_BY]["ratio"], "best": best["value"],
               "best_ratio": best[CHOOSE_BY]["ratio"], "candidates": {r["value"]: r[CHOOSE_BY]["ratio"] for r in rows}}
    if best is base:
        return {**verdict, "ci": None, "chosen": base["value"], "why": "the default is the held-out best"}
    h = base[CHOOSE_BY]
    low, high = difference_interval(best[CHOOSE_BY]["window_nll"], h["window_nll"], h["tokens_per_window"])
    if high < 0:
        return {**verdict, "ci": [low, high], "chosen": best["value"], "why": "better beyond the paired interval: adopt"}
    return {**verdict, "ci": [low, high], "chosen": base["value"], "why": "a tie within the paired interval: keep"}


def sweep_key(args, entry: dict, key: str, default) -> list[dict]:
    values = [str(v) for v in entry["sweeps"][key]]
    if not any(same_value(v, default) for v in values):
        values.append(str(default))  # the default always competes
    cache = args.cache or args.out / "runs" / "heldout_rule" / f"cache_{entry['model']}_{entry['method']}_{entry['quant']}"
    argv = ["--sweep", f"{key}={','.join(values)}", f"--method={entry['method']}", f"--quant={entry['quant']}",
            f"--model={entry['model']}", f"--out={args.out / 'heldout_rule'}", f"--cache={cache}"]
    if args.tiny:
        argv += ["--tiny", f"--tiny-model-dir={args.tiny_model_dir}"]
    _, rows = heldout_sweep.sweep_and_write(heldout_sweep.parse_args(argv))
    return rows


def run(args) -> dict:
    verdicts = []
    for entry in args.entries:
        for key in entry["sweeps"]:
            default = default_value(entry["model"], entry["method"], entry["quant"], key)
            log(f"{entry['method']} {entry['quant']}: {key} (default {default})")
            rows = sweep_key(args, entry, key, default)
            verdicts.append({"model": "tiny" if args.tiny else entry["model"], "method": entry["method"],
                             "quant": entry["quant"], "key": key, **decide(rows, default), "commit": code_commit()})
    path = args.out / "heldout_rule.json"
    fresh = {(v["model"], v["method"], v["quant"], v["key"]) for v in verdicts}
    kept = []
    if path.is_file():  # other entries' verdicts stay
        kept = [v for v in json.loads(path.read_text())["rows"] if (v["model"], v["method"], v["quant"], v["key"]) not in fresh]
    return {"choose_by": CHOOSE_BY, "rule": args.rule.name, "rows": kept + verdicts}


def markdown(result: dict) -> str:
    lines = ["# Held-out rule: every tuned default chosen on held-out calibration windows", "",
             f"Each key swept alone, the rest at their defaults; cells: ppl / FP on `{result['choose_by']}` (held-out "
             "calibration windows; the evaluation windows are not evaluated). A value replaces the default only when "
             "the 95 % paired interval of ppl(value) − ppl(default) lies below zero. Command: "
             "`python benchmarks/heldout_rule.py` (entries: `benchmarks/heldout_rule.yaml`).", "",
             "| model | method | quant | key | candidates (× FP) | default | held-out best − default (95 % paired) | "
             "rule keeps | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in result["rows"]:
        cells = ", ".join(f"{value}: {ratio:.4f}" for value, ratio in v["candidates"].items())
        ci = "-" if v["ci"] is None else f"{v['best']}: {v['ci'][0]:+.3f} to {v['ci'][1]:+.3f}"
        lines.append(f"| {v['model']} | {v['method']} | {v['quant']} | `{v['key']}` | {cells} | {v['default']} | {ci} | "
                     f"**{v['chosen']}** ({v['why']}) | {v['commit']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark("heldout_rule", parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
