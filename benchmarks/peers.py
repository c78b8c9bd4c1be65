"""Peers: llm-compressor's RTN, GPTQ, SmoothQuant+GPTQ, SpinQuant+GPTQ and QuIP+GPTQ on our model, data and windows.

Runs `llmcompressor.oneshot` (PyPI `llmcompressor`, which uses `compressed-tensors`) on exactly what our pipeline
uses, so our results table can show peers beside our rows:

* model: SmolLM2-135M-Instruct in fp32 through our own loader (`qllm_pipeline.model.model_loading`, conf/model/smollm2_135m.yaml);
* calibration: `calibration_windows(tokenize(wiki_sample calibration text), n, seq_len, seed)` with n, seq_len and seed
  from conf/calibrate/default.yaml (16 × 512, seed 0), i.e. exactly the windows of our `calibrate` stage;
* evaluation: on every corpus of `--corpora` (default wiki_sample and lee_news, as benchmarks/accuracy.py),
  `corpus_windows(tokenizer, load_corpus(name), seq_len, max_windows)` (the pipeline's windows, spread over the corpus's
  held-out documents: qllm_pipeline/data/windows.py) with conf/eval/default.yaml (512 tokens, 32 windows); each
  `oneshot` result is evaluated on every corpus. ppl = exp(mean next-token NLL over all predicted positions of all
  windows), the loss of qllm_pipeline/evaluation/perplexity.py, computed here with a full-model forward (4 windows per
  batch);
* scheme: ours (conf/quant/<quant>.yaml): integer weights per output channel, asymmetric min-max (static); input
  activations per token, dynamic, asymmetric; every Linear of the decoder blocks (q, k, v, o, gate, up, down), lm_head
  left in fp32.

After `oneshot` the model is evaluated as llm-compressor leaves it (status FROZEN: compressed-tensors fake-quantizes
the weights and the dynamic per-token input activations in every Linear's forward; SpinQuant's R4 and QuIP's V are
online Hadamard hooks that run before the input quantizer). For every run the first evaluation windows of the first
corpus are also evaluated with the input quantizers switched off (weights only), which shows that activation
quantization is active.

Recipes (llm-compressor's own recommended settings for each modifier, from its docstrings and examples; only the
quantization scheme is ours):

    rtn               QuantizationModifier(config_groups={ours}, ignore=["lm_head"])               (data-free)
    gptq              GPTQModifier(config_groups={ours}, ignore=["lm_head"])  block_size 128, dampening 0.01, actorder static
    smoothquant_gptq  SmoothQuantModifier(smoothing_strength=0.8) + the GPTQ above              (its W8A8 int8 examples)
    spinquant_gptq    SpinQuantModifier(rotations=["R1","R2","R4"], transform_block_size=64, transform_type="hadamard")
                      + the GPTQ above                                                          (its SpinQuant example)
    quip_gptq         QuIPModifier() (rotations ["v"], transform_type "random-hadamard", full size: its defaults, which
                      its docs recommend) + the GPTQ above

Install (a virtual environment of its own: llmcompressor 0.14.0.1 pins transformers<=5.17, the pipeline needs >=5.24;
torch stays the local CPU build 2.13.0), from the repository root:

    python -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/peers-requirements.txt \
        && .venv-peers/bin/pip install --no-deps -e .
    .venv-peers/bin/python benchmarks/peers.py

`--no-deps -e .` puts our package (its loaders, corpora and windows) in that venv without its own transformers range;
peers-requirements.txt lists what peers.py needs of its dependencies. On 2026-12-06 this gave llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0 and torch 2.13.0+cpu. (A `--system-site-packages` venv, as here
before, sees the base interpreter's packages, not the main venv's: it works only where the package and torch are
installed in the base interpreter.) `.venv-peers/` is git-ignored.

The full grid (15 runs, --fp-check) took 70.9 min with one torch thread under `nice -n 10` on the 2-core CPU machine
(benchmarks/results/peers.md).

Usage:

    .venv-peers/bin/python benchmarks/peers.py                      # 5 recipes × 3 bit widths, W4A4 first
    .venv-peers/bin/python benchmarks/peers.py --quants w4a4 --recipes rtn --eval-windows 4 --calib-samples 2   # smoke
    .venv-peers/bin/python benchmarks/peers.py --corpora wiki_sample    # evaluate on wiki_sample only
    .venv-peers/bin/python benchmarks/peers.py --merge benchmarks/results/accuracy.json   # run, then upsert the rows
    python benchmarks/peers.py --merge-only --merge some.json       # upsert <out>/peers.json's rows, no run (no llmcompressor needed)

Another model: `--model gemma3_270m --model-path DIR`, where DIR holds the model saved by the main install
(`python benchmarks/save_model.py gemma3_270m DIR`) (transformers 5.17, which llmcompressor pins, misloads Gemma-3 270M's GGUF: perplexity 147 for 14.7);
it is loaded whole, the windows start with BOS as the pipeline's do for Gemma, and the reports are
<out>/peers-<model>.json/.md. Rows carry "model" (rows without one are SmolLM2's).

Writes <out>/peers.json and <out>/peers.md after every run, so a killed run keeps its finished rows: one row per
(recipe, quant, corpus), with "dataset" and its "windows" (count, seq_len, rule) as benchmarks/accuracy.py's rows; the
json's "fp" and "fp_window_nll" are per corpus. `--merge PATH` upserts the successful rows into an accuracy.json-style
file ({"rows": [...]}), keyed by (tool, model, dataset, method, quant) (rows without a dataset are wiki_sample's); rows
of other tools (ours have no "tool" key) are left as they are. Bad command-line input ends with one `error: ...` line and
exit code 2.

Two things the script does for llm-compressor that are not part of any recipe: our loader reads a GGUF file, so the
model's `name_or_path` is a directory without config.json, which `oneshot` re-reads to refuse already-quantized
models; the script saves the (plain fp32) model's config to a temporary directory and points `name_or_path` there.
And `oneshot` changes the model in place, so every recipe runs on a fresh deep copy of the loaded model.
"""
from __future__ import annotations

import argparse
import atexit
import copy
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from peers_report import (  # noqa: E402
    ACT_CHECK_WINDOWS,
    CALIB_CORPUS,
    DEFAULT_MODEL,
    TOOL,
    load_rows_file,
    markdown,
    merge_into,
    report_stem,
    write_reports,
)

from _cli import CliError, Parser, code_commit, logger  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUANTS = ("w4a4", "w4a8", "w6a6")  # the default grid
KNOWN_QUANTS = (*QUANTS, "w8a8")  # conf/quant entries with integer activations
DEFAULT_CORPORA = ("wiki_sample", "lee_news")  # benchmarks/accuracy.py's EVAL_DATASETS
RECIPES = ("rtn", "gptq", "smoothquant_gptq", "spinquant_gptq", "quip_gptq")
RECIPE_TEXT = {
    "rtn": 'QuantizationModifier(config_groups={ours}, ignore=["lm_head"])',
    "gptq": 'GPTQModifier(config_groups={ours}, ignore=["lm_head"]) (block_size 128, dampening_frac 0.01, actorder static)',
    "smoothquant_gptq": "SmoothQuantModifier(smoothing_strength=0.8) + GPTQModifier as in gptq",
    "spinquant_gptq": 'SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_block_size=64, transform_type="hadamard") '
                      "+ GPTQModifier as in gptq",
    "quip_gptq": 'QuIPModifier() (rotations ["v"], transform_type "random-hadamard", block = full size) + GPTQModifier as in gptq',
}


log = logger("peers")


def group_config(group: str, option: str) -> dict:
    from qllm_pipeline.core.config import group_config as composed

    return composed(group, option, REPO / "conf")


# ---------------------------------------------------------------------------------------------------------------- CLI
def eval_corpora() -> list[str]:
    """The corpora --corpora accepts: the pipeline's named corpora but text_files, whose file paths this script has no
    options for (wikitext2 and c4 need hub access)."""
    from qllm_pipeline.data.corpora import CORPORA

    return [name for name in CORPORA if name != "text_files"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", default=",".join(QUANTS),
                   help=f"comma-separated, run in this order: {','.join(QUANTS)} (also: {','.join(KNOWN_QUANTS[len(QUANTS):])})")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated: {','.join(RECIPES)}")
    p.add_argument("--corpora", default=",".join(DEFAULT_CORPORA),
                   help=f"evaluation corpora, comma-separated (calibration stays {CALIB_CORPUS}); the first one also "
                        "gets the activation check")
    p.add_argument("--eval-windows", type=int, help="evaluation windows (default: conf/eval/default.yaml max_windows, 32)")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default: conf/calibrate/default.yaml n_samples, 16)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="directory for peers.json and peers.md")
    p.add_argument("--merge", type=Path, help="upsert the successful rows into this accuracy.json-style file")
    p.add_argument("--merge-only", action="store_true", help="no run: upsert the rows of <out>/peers.json into --merge")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: leaves the other core free)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="a conf/model entry (default: the embedded SmolLM2)")
    p.add_argument("--model-path", type=Path,
                   help="read the model from this saved (save_pretrained) directory instead: for a GGUF this venv's "
                        "transformers misloads (Gemma-3 270M under 5.17), saved by the main install")
    p.add_argument("--fp-check", action="store_true",
                   help="also evaluate FP with our block-by-block qllm_pipeline.evaluation.perplexity and record both numbers")
    args = p.parse_args(argv)
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    if not args.quants:
        raise CliError("--quants is empty; give e.g. --quants w4a4,w4a8")
    if not args.recipes:
        raise CliError("--recipes is empty; give e.g. --recipes rtn,gptq")
    if not args.corpora:
        raise CliError("--corpora is empty; give e.g. --corpora wiki_sample,lee_news")
    bad = [q for q in args.quants if q not in KNOWN_QUANTS]
    if bad:
        raise CliError(f"unknown quant(s) {bad}; choose from {list(KNOWN_QUANTS)}")
    bad = [r for r in args.recipes if r not in RECIPES]
    if bad:
        raise CliError(f"unknown recipe(s) {bad}; choose from {list(RECIPES)}")
    bad = [c for c in args.corpora if c not in eval_corpora()]
    if bad:
        raise CliError(f"unknown corpus(es) {bad}; choose from {eval_corpora()}")
    if any(len(set(items)) != len(items) for items in (args.quants, args.recipes, args.corpora)):
        raise CliError("--quants, --recipes and --corpora must not repeat an entry")
    for name in ("eval_windows", "calib_samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')}={value} must be a positive integer")
    if not (REPO / "conf" / "model" / f"{args.model}.yaml").is_file():
        raise CliError(f"unknown --model={args.model}; choose a conf/model entry")
    if args.model_path is not None and not (args.model_path / "config.json").is_file():
        raise CliError(f"--model-path={args.model_path} has no config.json; save the model there with save_pretrained")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out={args.out} is a file; give a directory")
    if args.merge_only and not args.merge:
        raise CliError("--merge-only needs --merge PATH (the file to upsert into)")
    if args.merge is not None:
        if args.merge.is_dir():
            raise CliError(f"--merge={args.merge} is a directory; give an accuracy.json-style file")
        if args.merge.exists():
            load_rows_file(args.merge)  # refuse a malformed target before spending an hour
    if args.merge_only and not (args.out / f"{report_stem(args.model)}.json").is_file():
        raise CliError(f"--merge-only: {args.out / (report_stem(args.model) + '.json')} does not exist; "
                       "run the benchmark first")
    return args


# -------------------------------------------------------------------------------------------------- llm-compressor
def scheme_for(quant: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = group_config("quant", quant)
    group = q.get("group_size")
    weights = QuantizationArgs(
        num_bits=int(q["wbits"]), type="int", symmetric=bool(q["w_symmetric"]), dynamic=False,
        strategy="group" if group else "channel", group_size=group,
    )
    acts = QuantizationArgs(num_bits=int(q["abits"]), type="int", strategy="token", dynamic=True,
                            symmetric=bool(q["a_symmetric"]))
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def build_recipe(name: str, quant: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    groups = {"group_0": scheme_for(quant)}
    if name == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    gptq = GPTQModifier(config_groups=groups, ignore=["lm_head"])
    if name == "gptq":
        return [gptq]
    if name == "smoothquant_gptq":
        return [SmoothQuantModifier(smoothing_strength=0.8), gptq]
    if name == "spinquant_gptq":
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_block_size=64, transform_type="hadamard"), gptq]
    if name == "quip_gptq":
        return [QuIPModifier(), gptq]
    raise ValueError(name)


def window_nlls(model, windows, batch_size: int = 4, desc: str = "eval") -> list[tuple[float, int]]:
    """(sum of next-token NLL, number of predicted positions) per window, the loss of qllm_pipeline/evaluation/perplexity.py."""
    import torch
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False, file=sys.stdout):
            ids = windows[start : start + batch_size]
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            for w in nll.view(ids.shape[0], -1):
                out.append((w.sum().item(), w.numel()))
    return out


def ppl_of(nlls: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in nlls) / sum(c for _, c in nlls))


def weights_only_ppl(model, windows) -> float:
    """ppl with every input quantizer switched off (weights stay fake-quantized), to show activation quant is active."""
    changed = []
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.input_activations is not None:
            changed.append((module, scheme))
            module.quantization_scheme = scheme.model_copy(update={"input_activations": None})
    try:
        return ppl_of(window_nlls(model, windows, desc="eval weights-only"))
    finally:
        for module, scheme in changed:
            module.quantization_scheme = scheme


def count_quantized(model) -> int:
    return sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)


def run_one(pristine, tokenizer, recipe: str, quant: str, calib, evals: dict) -> dict:
    """One `oneshot` on a fresh copy of the model, evaluated on every corpus's windows (`evals`: corpus -> windows)."""
    from datasets import Dataset
    from llmcompressor import oneshot

    model = copy.deepcopy(pristine)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * calib.shape[0]})
    started = time.perf_counter()
    oneshot(
        model=model, tokenizer=tokenizer, dataset=dataset, recipe=build_recipe(recipe, quant),
        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - started
    n_quant = count_quantized(model)
    if n_quant != 7 * model.config.num_hidden_layers:
        raise RuntimeError(f"{n_quant} modules quantized, expected {7 * model.config.num_hidden_layers}")
    nlls, eval_seconds = {}, {}
    for dataset, windows in evals.items():
        started = time.perf_counter()
        nlls[dataset] = window_nlls(model, windows, desc=f"eval {recipe} {quant} {dataset}")
        eval_seconds[dataset] = round(time.perf_counter() - started, 1)
    return {"nlls": nlls, "seconds": round(seconds, 1), "eval_seconds": eval_seconds,
            "act_check": act_check(model, *next(iter(evals.items())), nlls), "quantized_modules": n_quant}


def act_check(model, dataset: str, windows, nlls: dict) -> dict:
    """The first windows of one corpus again with the input quantizers off: W+A must differ from weights only."""
    k = min(ACT_CHECK_WINDOWS, windows.shape[0])
    check = {"dataset": dataset, "windows": k, "ppl_quantized": ppl_of(nlls[dataset][:k]),
             "ppl_weights_only": weights_only_ppl(model, windows[:k])}
    if check["ppl_quantized"] == check["ppl_weights_only"]:
        raise RuntimeError("activation quantization is not active: W+A and weights-only perplexities are equal")
    return check


def run_head(base: dict, dataset: str, result: dict) -> dict:
    """What every row of one run on one corpus carries, whether the run succeeded or not."""
    windows = result["windows"][dataset]
    return {**base, "dataset": dataset, "windows": windows, "eval_windows": windows["count"], "fp": result["fp"][dataset]}


def ok_row(base: dict, dataset: str, out: dict, result: dict) -> dict:
    """One run's row on one corpus: ppl, its ratio to that corpus's FP and the ratio's paired 95 % interval."""
    from qllm_pipeline.evaluation.intervals import ratio_interval

    row = run_head(base, dataset, result)
    nll, ppl = [n for n, _ in out["nlls"][dataset]], ppl_of(out["nlls"][dataset])
    low, high = ratio_interval(nll, result["fp_window_nll"][dataset], row["windows"]["seq_len"] - 1)
    row.update({"status": "ok", "ppl": ppl, "ratio": ppl / row["fp"], "ci_low": low, "ci_high": high, "window_nll": nll,
                "seconds": out["seconds"], "eval_seconds": out["eval_seconds"][dataset]})
    if out["act_check"]["dataset"] == dataset:
        row["act_check"] = out["act_check"]
    return row


def failed_row(base: dict, dataset: str, error: str, result: dict) -> dict:
    return {**run_head(base, dataset, result), "status": "failed", "error": error, "ppl": None, "ratio": None,
            "seconds": None}


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"[:300]


def eval_windows_of(tokenizer, corpora: list[str], seq_len: int, max_windows: int, bos) -> dict:
    """Each corpus's evaluation windows, as the pipeline evaluates them (spread over its held-out documents)."""
    from qllm_pipeline.data.corpora import corpus_windows, load_corpus
    from qllm_pipeline.data.windows import start_with

    return {name: start_with(corpus_windows(tokenizer, load_corpus(name), seq_len, max_windows), bos) for name in corpora}


def fp_blockwise_ppl(model, evals: dict) -> dict:
    """FP through our pipeline's block-by-block perplexity on the same windows, per corpus (--fp-check)."""
    import torch

    from qllm_pipeline.evaluation.perplexity import blockwise_perplexity
    from qllm_pipeline.quantized.blocks import decoder_layers

    layers = decoder_layers(model)
    return {name: blockwise_perplexity(model, windows, {"fp": lambda i: layers[i]}, torch.device("cpu"), 4,
                                       desc=f"fp blockwise {name}")["fp"] for name, windows in evals.items()}


def run(args, command: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers

    from qllm_pipeline.data.corpora import load_corpus, tokenize
    from qllm_pipeline.data.windows import WINDOWS_RULE, calibration_windows, start_with, window_bos
    from qllm_pipeline.model.model_loading import ModelSource, load_config, load_model, load_tokenizer

    t0 = time.perf_counter()
    cal_cfg, eval_cfg = group_config("calibrate", "default"), group_config("eval", "default")
    settings = {
        "calib_samples": args.calib_samples or int(cal_cfg["n_samples"]), "calib_seq_len": int(cal_cfg["seq_len"]),
        "calib_seed": int(cal_cfg["seed"]), "eval_seq_len": int(eval_cfg["seq_len"]), "threads": args.threads,
        "eval_windows": args.eval_windows or int(eval_cfg["max_windows"]),  # the most per corpus: "windows" has each one's
    }
    model_cfg = group_config("model", args.model)
    if args.model_path is not None:
        # loaded whole: oneshot walks the model's modules (a streamed model's blocks are not submodules)
        model_cfg.update(path=str(args.model_path), package=None, gguf_file=None, hub_id=None, load="whole")
    source = ModelSource.from_config(model_cfg)
    log(f"loading {source.name} through qllm_pipeline.model.model_loading")
    load_config(source)
    pristine, tokenizer = load_model(source), load_tokenizer(source)
    # oneshot re-reads config.json from name_or_path to refuse already-quantized models; ours came from a GGUF file.
    config_dir = tempfile.mkdtemp(prefix="peers-config-")
    atexit.register(shutil.rmtree, config_dir, ignore_errors=True)
    pristine.config.save_pretrained(config_dir)
    pristine.config._name_or_path = config_dir
    pristine.name_or_path = config_dir
    bos = window_bos(pristine.config, tokenizer)  # the windows start as the pipeline's do (Gemma: with BOS)
    calib = start_with(calibration_windows(tokenize(tokenizer, load_corpus(CALIB_CORPUS).calib_text),
                                           settings["calib_samples"], settings["calib_seq_len"], seed=settings["calib_seed"]), bos)
    evals = eval_windows_of(tokenizer, args.corpora, settings["eval_seq_len"], settings["eval_windows"], bos)
    windows = {name: {"count": int(w.shape[0]), "seq_len": int(w.shape[1]), "rule": WINDOWS_RULE} for name, w in evals.items()}
    log(f"calibration {tuple(calib.shape)}, evaluation " + ", ".join(f"{n} {tuple(w.shape)}" for n, w in evals.items()))
    fp_nlls = {name: window_nlls(pristine, w, desc=f"eval fp {name}") for name, w in evals.items()}
    fp = {name: ppl_of(nlls) for name, nlls in fp_nlls.items()}
    log("FP ppl " + ", ".join(f"{name} {ppl:.3f}" for name, ppl in fp.items()))
    fp_blockwise = fp_blockwise_ppl(pristine, evals) if args.fp_check else None
    if fp_blockwise:
        log("FP ppl through qllm_pipeline.evaluation.perplexity (block by block): "
            + ", ".join(f"{name} {ppl:.3f}" for name, ppl in fp_blockwise.items()))
    result = {
        "tool": TOOL, "tool_version": llmcompressor.__version__, "command": command, "model": args.model,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "settings": settings, "quants": args.quants, "recipes": args.recipes, "corpora": args.corpora, "windows": windows,
        "fp": fp, "fp_blockwise": fp_blockwise, "fp_window_nll": {name: [n for n, _ in nlls] for name, nlls in fp_nlls.items()},
        "recipe_text": {m: RECIPE_TEXT[m] for m in args.recipes}, "total_wall_s": None, "rows": [],
    }
    write_reports(args.out, result)
    runs = [(q, m) for q in args.quants for m in args.recipes]
    for i, (quant, recipe) in enumerate(runs, 1):
        log(f"run {i}/{len(runs)}: {recipe} {quant}")
        base = {"tool": TOOL, "tool_version": llmcompressor.__version__, "model": args.model, "method": recipe, "quant": quant,
                "calib": f"{settings['calib_samples']}x{settings['calib_seq_len']}", "commit": code_commit()}
        try:
            out = run_one(pristine, tokenizer, recipe, quant, calib, evals)
        except Exception as exc:  # one recipe failing must not stop the grid
            traceback.print_exc()
            result["rows"] += [failed_row(base, name, one_line(exc), result) for name in args.corpora]
            log(f"run {i}/{len(runs)}: {recipe} {quant} FAILED: {one_line(exc)}")
        else:
            rows = [ok_row(base, name, out, result) for name in args.corpora]
            result["rows"] += rows
            chk = out["act_check"]
            log(f"run {i}/{len(runs)}: {recipe} {quant}: oneshot {out['seconds']:.1f} s; "
                + "; ".join(f"{r['dataset']} ppl {r['ppl']:.3f} ({r['ratio']:.2f}× FP, eval {r['eval_seconds']:.1f} s)" for r in rows)
                + f"; first {chk['windows']} windows of {chk['dataset']} W+A {chk['ppl_quantized']:.2f} vs weights only "
                f"{chk['ppl_weights_only']:.2f}")
        write_reports(args.out, result)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    write_reports(args.out, result)
    log(f"done in {result['total_wall_s'] / 60:.1f} min; wrote {args.out / report_stem(args.model)}.md and .json")
    return result


def invocation() -> list[str]:
    """How this run was started, for the report: `nice -n N` when niced, and the interpreter (venv) used."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(REPO)
    except ValueError:
        pass
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    return ([f"nice -n {niceness}"] if niceness > 0 else []) + [str(python)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.merge_only:
            merge_into(args.merge, load_rows_file(args.out / f"{report_stem(args.model)}.json")["rows"])
            return 0
        try:
            import llmcompressor  # noqa: F401
        except ImportError:
            raise CliError("llmcompressor is not installed in this python; see the install commands at the top of "
                           "benchmarks/peers.py (python -m venv .venv-peers && .venv-peers/bin/pip install -r "
                           "benchmarks/peers-requirements.txt && .venv-peers/bin/pip install --no-deps -e .)") from None
        args.out.mkdir(parents=True, exist_ok=True)
        command = " ".join([*invocation(), "benchmarks/peers.py", *argv])
        result = run(args, command)
        if args.merge:
            merge_into(args.merge, result["rows"])
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
