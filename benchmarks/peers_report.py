"""The peers' results (benchmarks/peers.py): rows merged into an accuracy.json-style file, and peers.md written from
a run's result. Nothing here needs llm-compressor."""
from __future__ import annotations

import json
from pathlib import Path

from _cli import CliError, logger, write_atomic

TOOL = "llm-compressor"
CALIB_CORPUS = "wiki_sample"  # every run is calibrated on it, as the pipeline's benchmark rows
DEFAULT_MODEL = "smollm2_135m"  # rows without a "model" key are this model's
DEFAULT_DATASET = "wiki_sample"  # rows without a "dataset" key are this corpus's (accuracy.py's dataset_of)
ACT_CHECK_WINDOWS = 2  # windows evaluated a second time with the input quantizers off

log = logger("peers")


# -------------------------------------------------------------------------------------------------------------- merge
def load_rows_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"{path} is not readable JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise CliError(f"{path} is not an accuracy.json-style file (a JSON object with a 'rows' list)")
    return data


def dataset_of(row: dict) -> str:
    return row.get("dataset") or DEFAULT_DATASET  # rows written before rows named their corpus


def row_key(row: dict) -> tuple:
    """accuracy.py's merge key: a lee_news row never replaces a wiki_sample row of the same run."""
    return row.get("tool"), row.get("model", DEFAULT_MODEL), dataset_of(row), row.get("method"), row.get("quant")


def upsert_rows(data: dict, rows: list[dict]) -> tuple[dict, int, int]:
    """Replace the rows of `data` with the same (tool, model, dataset, method, quant) as a row of `rows` in place,
    append the others.

    Returns (data, replaced, added). Rows of other tools, or of ours with no "tool" key, are never touched."""
    new = {row_key(r): r for r in rows}
    out, replaced = [], 0
    for r in data["rows"]:
        if row_key(r) in new and r.get("tool") is not None:
            out.append(new.pop(row_key(r)))
            replaced += 1
        else:
            out.append(r)
    added = [r for r in rows if row_key(r) in new]
    data["rows"] = out + added
    return data, replaced, len(added)


def merge_into(path: Path, rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    # one failed oneshot fails the run's row on every corpus: named once
    skipped = list(dict.fromkeys(f"{r['method']}/{r['quant']}" for r in rows if r.get("status", "ok") != "ok"))
    data = load_rows_file(path) if path.exists() else {"rows": []}
    data, replaced, added = upsert_rows(data, ok)
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    log(f"merged into {path}: {replaced} row(s) replaced, {added} added"
        + (f"; failed rows not merged: {', '.join(skipped)}" if skipped else ""))


# ------------------------------------------------------------------------------------------------------------ reports
def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row.get("status") != "ok":
        return "failed"
    return f"{row['ppl']:.2f} ({row['ratio']:.2f}×)"


def per_corpus(value) -> dict:
    """A per-corpus value of the result ({corpus: value}); a peers.json from before --corpora holds wiki_sample's alone."""
    if value is None:
        return {}
    return value if isinstance(value, dict) else {DEFAULT_DATASET: value}


def corpora_of(result: dict) -> list[str]:
    return list(result.get("corpora") or per_corpus(result["fp"]))


def windows_text(result: dict, dataset: str) -> str:
    w = (result.get("windows") or {}).get(dataset)
    if w is None:  # a peers.json from before the windows were spread over the documents
        s = result["settings"]
        return f"the first {s['eval_windows']} windows of {s['eval_seq_len']} tokens"
    return f"{w['count']} × {w['seq_len']} tokens, {w['rule']}"


def corpus_table(result: dict, dataset: str) -> list[str]:
    """One corpus's perplexity table: a row per recipe, a column per bit width, FP first."""
    quants, recipes = list(result["quants"]), list(result["recipes"])  # the requested ones: "-" = not run (yet)
    by = {(r["method"], r["quant"]): r for r in result["rows"] if dataset_of(r) == dataset}
    fp, blockwise = per_corpus(result["fp"])[dataset], per_corpus(result.get("fp_blockwise")).get(dataset)
    lines = [
        f"## {dataset} ({windows_text(result, dataset)})",
        "",
        "| method | " + " | ".join(quants) + " |",
        "|---|" + "---:|" * len(quants),
        "| fp | " + " | ".join(f"{fp:.2f} (1.00×)" for _ in quants) + " |",
    ]
    lines += [f"| {m} | " + " | ".join(cell(by.get((m, q))) for q in quants) + " |" for m in recipes]
    lines += ["", f"FP perplexity through this script's path (full-model forward): {fp:.3f}."]
    if blockwise is not None:
        lines[-1] += f" Our pipeline's block-by-block `qllm_pipeline.evaluation.perplexity` on the same windows: {blockwise:.3f}."
    return lines


def run_line(r: dict) -> str:
    """A row of the "Every run" table: oneshot's time is the run's, shared by its corpora."""
    if r.get("status") != "ok":
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "-"
        return f"| {r['quant']} | {r['method']} | {dataset_of(r)} | failed: {r.get('error', '?')} | - | - | {secs} | - | - | - |"
    chk = r.get("act_check")  # the first corpus's rows only
    check = f"{chk['ppl_quantized']:.2f} | {chk['ppl_weights_only']:.2f}" if chk else "- | -"
    return (f"| {r['quant']} | {r['method']} | {dataset_of(r)} | ok | {r['ppl']:.3f} | {r['ratio']:.2f} | {r['seconds']:.1f} | "
            f"{r['eval_seconds']:.1f} | {check} |")


def markdown(result: dict) -> str:
    rows = result["rows"]
    recipes, corpora = list(result["recipes"]), corpora_of(result)
    s = result["settings"]
    lines = [
        "# Peers: llm-compressor on our model, calibration windows and evaluation windows",
        "",
        f"Tool: **llm-compressor {result['tool_version']}** (compressed-tensors {result['versions']['compressed-tensors']}, "
        f"transformers {result['versions']['transformers']}, torch {result['versions']['torch']}), "
        f"run from `benchmarks/peers.py` in its own virtual environment.",
        "",
        f"Model {result.get('model', DEFAULT_MODEL)} (fp32, our loader). Calibration: {s['calib_samples']} × {s['calib_seq_len']} tokens of "
        f"`{CALIB_CORPUS}` (`calibration_windows`, seed {s['calib_seed']}: our `calibrate` stage's windows). Evaluation, "
        f"on each of {', '.join(corpora)}: up to {s['eval_windows']} windows of {s['eval_seq_len']} tokens spread over the "
        "corpus's held-out documents (one window in each document first, then evenly over the rest: "
        "`qllm_pipeline/data/windows.py`); each table's title gives its windows. Cells are perplexity "
        "(× FP). Scheme (ours): int weights per output channel, asymmetric min-max; int input activations per token, "
        "dynamic, asymmetric; all seven Linear layers of every decoder block, lm_head in fp32.",
        "",
        f"Command: `{result['command']}` (torch threads: {s['threads']})",
    ]
    for dataset in corpora:
        lines += ["", *corpus_table(result, dataset)]
    lines += [
        "",
        "## Every run",
        "",
        "oneshot = wall time of `llmcompressor.oneshot` (calibration + algorithm), one per quant and method; eval = the "
        f"evaluation on that corpus's windows. The last two columns evaluate the first {ACT_CHECK_WINDOWS} windows of "
        f"{corpora[0]} again with the input quantizers switched off (weights only): different numbers show that "
        "activation quantization is active.",
        "",
        f"| quant | method | dataset | status | ppl | × FP | oneshot (s) | eval (s) | ppl, first {ACT_CHECK_WINDOWS} windows: W+A | weights only |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
        *[run_line(r) for r in rows],
    ]
    lines += ["", "## Recipes", ""]
    lines += [f"* `{m}`: `{result.get('recipe_text', {}).get(m, '-')}`" for m in recipes]
    lines += [
        "",
        "`{ours}` = `QuantizationScheme(targets=[\"Linear\"], weights=QuantizationArgs(num_bits=W, type=\"int\", "
        "strategy=\"channel\", symmetric=False), input_activations=QuantizationArgs(num_bits=A, type=\"int\", "
        "strategy=\"token\", dynamic=True, symmetric=False))`; llm-compressor's default weight observer for it is "
        "`memoryless_minmax` (the same min-max as ours). `oneshot(..., num_calibration_samples=N, max_seq_length=L, "
        "shuffle_calibration_samples=False)` with our windows as a tokenized `datasets.Dataset`; the pipeline is the one "
        "llm-compressor infers (data-free for RTN, sequential layer by layer for the others).",
    ]
    lines += [
        "",
        "Notes: SpinQuant's R1 needs a Hadamard size that divides hidden 576 and is a power of two for "
        "`transform_type=\"hadamard\"`; the example's block size 64 does (576 = 9 × 64, head_dim 64, intermediate 1536 = "
        "24 × 64), so R1 and R4 are block-diagonal 64 × 64 Hadamards. Before rotating, SpinQuantModifier always centers "
        "the embeddings (subtracts each row's mean), which preserves a LayerNorm model but not an RMSNorm one like "
        "SmolLM2, so its FP model is not exactly ours. QuIP's V is a full-size random Hadamard on the input of every "
        "Linear, applied online (a forward pre-hook, before the input quantizer) and fused inversely into the weights.",
    ]
    if result.get("total_wall_s") is not None:
        lines += ["", f"Total wall time: {result['total_wall_s'] / 60:.1f} min ({result['total_wall_s']:.0f} s), "
                      "including loading the model and the FP evaluation."]
    else:
        runs = {(r["method"], r["quant"]) for r in rows}  # a run's rows: one per corpus
        lines += ["", f"Partial results: {len(runs)} of {len(result['quants']) * len(result['recipes'])} runs finished so far."]
    return "\n".join(lines) + "\n"


def report_stem(model: str) -> str:
    """peers.json/.md for the default model, peers-<model>.json/.md for another."""
    return "peers" if model == DEFAULT_MODEL else f"peers-{model}"


def write_reports(out: Path, result: dict) -> None:
    stem = report_stem(result.get("model", DEFAULT_MODEL))
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", markdown(result))
