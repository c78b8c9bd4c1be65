"""evaluate: perplexity of FP, RTN and the pipeline's quantized model(s) on each evaluation corpus.

Each (variant, corpus) result is its own cached artifact, so changing e.g. the LRC rank re-evaluates only the
rows that depend on it. All missing variants are streamed through the blocks together.
"""
from __future__ import annotations

import logging

from qllm_pipeline.core.identity import tensor_digest
from qllm_pipeline.core.stage import FINAL, FinalStage, StageSpec
from qllm_pipeline.data.corpora import corpus_windows, document_token_starts, load_corpus, token_cache_dir, tokenize
from qllm_pipeline.data.windows import (
    HELDOUT,
    WINDOWS_RULE,
    calibration_starts,
    heldout_windows,
    start_with,
    window_bos,
)
from qllm_pipeline.evaluation.intervals import ratio_interval
from qllm_pipeline.evaluation.perplexity import WindowNLL, blockwise_nll
from qllm_pipeline.methods.weight_rounding import weight_rounding
from qllm_pipeline.model.streaming import swapped_layers
from qllm_pipeline.quantized.blocks import decoder_layers
from qllm_pipeline.quantized.fused import build_fused_block
from qllm_pipeline.quantized.qblock import load_reassemblies, make_quant_block

log = logging.getLogger(__name__)

class Evaluate(FinalStage):
    # Every row is keyed by the digest of the evaluation tokens and the model's identity (see `evaluate`), not by names.
    # version 3: each row also stores its windows' NLLs (the paired intervals need them)
    spec = StageSpec("evaluate", version=3, config_keys=(), kind=FINAL)

    def run(self, ctx, runner) -> dict:
        return evaluate(ctx, runner, runner.artifacts)


def method_names(ctx, runner) -> list[str]:
    """The parts of this run's method, e.g. ["rotation", "cra", "lrc", "gptq"] (GPTQ: the weight rounding)."""
    label = weight_rounding(ctx.cfg).label
    return runner.labels() + ([label] if label and runner.enabled("fuse") else [])


def variant_plan(ctx, runner, artifacts) -> dict[str, tuple[dict, object, object]]:
    """name -> (cache dependencies, function giving block i, the model whose embeddings and head frame the blocks).

    fp and rtn are computed on the model as loaded, so they are the same rows (and cache entries) for every method;
    the pipeline's own result is computed on ctx.model (the rotated view when the rotate stage ran).
    """
    fp_layers, layers = decoder_layers(ctx.fp_model), decoder_layers(ctx.model)
    wspec, aspec, attn = ctx.weight_spec, ctx.act_spec, ctx.attn_spec
    plan = {"fp": ({}, lambda i: fp_layers[i], ctx.fp_model)}
    if not (wspec.enabled or aspec.enabled):
        return plan
    def from_fused(i):
        return build_fused_block(layers[i], runner.block_tensors(i), aspec, wspec, attn)

    methods = method_names(ctx, runner)
    quant = {"quant": ctx.cfg["quant"]}
    if not methods:  # the fused model is plain RTN: evaluate it from the artifacts, not a second copy
        plan["rtn"] = ({**quant, "fuse": ctx.keys["model"]}, from_fused, ctx.model)
        return plan
    plan["rtn"] = (quant, lambda i: make_quant_block(fp_layers[i], wspec, aspec, attn_spec=attn), ctx.fp_model)
    if methods == ["cra", "lrc"]:  # what CRA alone gave on this run's blocks, before LRC
        reassembled = artifacts["reassemble"]
        plan["cra"] = (
            {**quant, "reassemble": reassembled[-1].path.name},
            lambda i: make_quant_block(
                layers[i], wspec, aspec, load_reassemblies(reassembled[i].tensors("reassembly.safetensors")), attn
            ),
            ctx.model,
        )
    plan["+".join(methods)] = ({**quant, "fuse": ctx.keys["model"]}, from_fused, ctx.model)
    return plan


def evaluate(ctx, runner, artifacts) -> dict:
    cfg = ctx.cfg["eval"]
    plan = variant_plan(ctx, runner, artifacts)
    table: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    window_nll: dict[str, dict[str, list[float]]] = {}
    chosen: dict[str, dict] = {}  # how each dataset's windows were chosen
    for dataset in cfg["datasets"]:
        windows = _windows(ctx, dataset, cfg)
        chosen[dataset] = {"count": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "rule": WINDOWS_RULE}
        # Keyed by the tokens evaluated and the model, so a row is never reused for another text or model.
        source = {"windows": tensor_digest(windows), "model": ctx.model_id}
        keys = {name: runner.key("evaluate", {**deps, **source}, extra={"variant": name}) for name, (deps, *_) in plan.items()}
        results = _cached_rows(ctx, runner, keys)
        todo = [name for name in plan if name not in results]
        if todo:
            # Hold the missing rows' locks while computing them: a parallel job needing the same rows waits, then reads.
            with ctx.cache.locked("evaluate", [keys[n] for n in todo]):
                results.update(_cached_rows(ctx, runner, {n: keys[n] for n in todo}))
                todo = [name for name in plan if name not in results]
                if todo:
                    results.update(_compute_rows(ctx, runner, plan, todo, keys, dataset, windows, cfg))
            ctx.world.barrier()  # under torchrun, rank 0 wrote the rows while holding their locks
        table[dataset] = {name: results[name]["ppl"] for name in plan}
        intervals[dataset] = ratio_intervals({name: results[name] for name in plan})
        window_nll[dataset] = {name: results[name]["window_nll"] for name in plan}
    # the windows' NLLs go out too: a row compared with another tool's on the same windows is paired through them
    out = {"ppl": table, "ppl_ci": intervals, "window_nll": window_nll, "windows": chosen}
    if cfg.get("tasks"):
        out["zeroshot"] = zeroshot(ctx, runner, plan, cfg)
    return out


def ratio_intervals(rows: dict[str, dict]) -> dict[str, list[float]]:
    """Each variant's 95 % paired-bootstrap interval of its ratio to FP, over the windows (FP itself has none)."""
    fp = rows.get("fp")
    if fp is None or len(fp["window_nll"]) < 2:
        return {}
    return {name: list(ratio_interval(row["window_nll"], fp["window_nll"], row["tokens_per_window"]))
            for name, row in rows.items() if name != "fp"}


def _cached_rows(ctx, runner, keys: dict[str, str]) -> dict[str, dict]:
    """name -> the stored row ({"ppl", "window_nll", "tokens_per_window", ...}) for the rows in the cache (rank 0's
    rows under torchrun: every rank computes the same missing ones)."""
    if runner.is_forced("evaluate"):
        return {}
    rows = None
    if ctx.world.is_writer:
        found = {name: ctx.cache.get("evaluate", key) for name, key in keys.items()}
        rows = {name: artifact.json("ppl.json") for name, artifact in found.items() if artifact is not None}
    rows = ctx.world.broadcast_object(rows)
    runner.records["evaluate"].cached += len(rows)
    return rows


def _compute_rows(ctx, runner, plan, todo, keys, dataset, windows, cfg) -> dict[str, dict]:
    """Perplexity of the `todo` variants (their locks held by the caller), each stored as its own artifact."""
    log.info("perplexity on %s: %d windows × %d tokens, variants %s", dataset, *windows.shape, todo)
    computed = {}
    # Under torchrun each rank evaluates its share of the windows (whole batches, in order); the parts combine to
    # the one-process numbers.
    mine = windows[ctx.world.shard(windows.shape[0], cfg["batch_size"])]
    for model in {id(plan[n][2]): plan[n][2] for n in todo}.values() if mine.shape[0] else ():
        variants = {n: plan[n][1] for n in todo if plan[n][2] is model}  # variants sharing a model stream together
        computed.update(blockwise_nll(model, mine, variants, ctx.device, cfg["batch_size"], ctx.progress, desc=f"ppl {dataset}"))
    parts = ctx.world.gather_objects(computed)
    computed = {name: WindowNLL.combine([part[name] for part in parts if name in part]) for name in todo}
    rows = {}
    for name, nll in computed.items():
        record = rows[name] = {"ppl": nll.ppl, "window_nll": nll.window_nll, "tokens_per_window": nll.tokens_per_window,
                               "variant": name, "dataset": dataset, "windows": list(windows.shape)}
        ctx.cache.put("evaluate", keys[name], lambda w, r=record: w.save_json("ppl.json", r),
                      replace=runner.is_forced("evaluate"), lock=False)  # the caller holds the rows' locks
        runner.records["evaluate"].computed += 1
    return rows


def zeroshot(ctx, runner, plan: dict, cfg: dict) -> dict:
    """lm-eval accuracy per variant: the variant's blocks are swapped into the in-memory model for the call."""
    from qllm_pipeline.evaluation.zeroshot import run_zeroshot

    tasks = list(cfg["tasks"])
    table = {}
    for name, (deps, block_for, model) in plan.items():
        key = runner.key("evaluate", {**deps, "model": ctx.model_id},
                         extra={"variant": name, "tasks": tasks, "limit": cfg.get("limit"), "zeroshot": True})

        def compute(writer, name=name, block_for=block_for, model=model):
            # lm-eval runs the whole model's forward: the variant's blocks are all built and swapped in for the call
            # (the one place a streamed model is held whole).
            with swapped_layers(model, [block_for(i) for i in range(len(decoder_layers(model)))]):
                log.info("zero-shot %s on %s", name, tasks)
                writer.save_json("zeroshot.json", run_zeroshot(model, ctx.tokenizer, tasks, cfg.get("limit"), cfg["batch_size"], ctx.device))

        # lm-eval runs the whole model in one process: under torchrun, rank 0 alone
        artifact = runner.produce("evaluate", key, compute, timed=False, collective=False)
        table[name] = artifact.json("zeroshot.json")
    return table


def _windows(ctx, dataset: str, cfg: dict):
    return start_with(_text_windows(ctx, dataset, cfg), window_bos(ctx.model.config, ctx.tokenizer))


def _text_windows(ctx, dataset: str, cfg: dict):
    if dataset == HELDOUT:  # the calibration split's windows that calibrate did not draw
        cal, cache_dir = ctx.cfg["calibrate"], token_cache_dir()
        corpus = load_corpus(ctx.cfg["data"]["name"], ctx.cfg["data"])
        tokens = tokenize(ctx.tokenizer, corpus.calib_text, cache_dir)
        starts = calibration_starts(tokens.numel(), cal["n_samples"], cal["seq_len"], cal["seed"])
        docs = document_token_starts(ctx.tokenizer, corpus.calib_text, corpus.calib_docs, cache_dir)
        return heldout_windows(tokens, starts, cal["seq_len"], cfg["seq_len"], cfg["max_windows"], docs)
    corpus = load_corpus(dataset, ctx.cfg["data"])
    return corpus_windows(ctx.tokenizer, corpus, cfg["seq_len"], cfg["max_windows"], token_cache_dir())
