"""Hydra entry point. Bad input ends with one `error: ...` line on stderr and exit code 2."""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from qllm_pipeline.core.cache import ArtifactCache, is_disk_full
from qllm_pipeline.core.config import conf_dir
from qllm_pipeline.core.distributed import (
    SharedCache,
    adopt_submitit_tasks,
    collective_seconds,
    env_world,
    init_from_env,
)
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.identity import model_key
from qllm_pipeline.core.memory import release_freed_memory
from qllm_pipeline.core.report import cpu_model, write_results
from qllm_pipeline.core.runner import RunContext, Runner, peak_rss_mib, validate_config
from qllm_pipeline.core.schema import check_overrides, validate_schema
from qllm_pipeline.core.tracking import make_tracker
from qllm_pipeline.export.packed import specs_from_quant_cfg
from qllm_pipeline.model.arch import check_config, family_of
from qllm_pipeline.model.model_loading import ModelSource, digest_memo_dir, load_config, load_model, load_tokenizer
from qllm_pipeline.quantized.attention import attention_spec

log = logging.getLogger("qllm_pipeline")


CONF_DIR = conf_dir()


def fail(message: str) -> None:
    if env_world().is_writer:  # one line for the job, not one per rank
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_command_line(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse a bad command line with one PipelineError before Hydra composes it (Hydra's own message is a page): a
    `group=option` naming a missing option, an unknown key, or a value of the wrong type or range."""
    for arg in argv:
        if "=" not in arg or arg.startswith(("-", "+", "~", "hydra")):
            continue
        key, value = arg.split("=", 1)
        group_dir = conf_dir / key
        if "." in key or not group_dir.is_dir():
            continue
        for option in value.split(","):
            if not (group_dir / f"{option}.yaml").exists():
                choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
                raise PipelineError(f"unknown {key}={option}; choose one of {choices} (or add conf/{key}/{option}.yaml)")
    check_overrides([a for a in argv if not a.startswith("-")], {p.name for p in conf_dir.iterdir() if p.is_dir()})


def quant_specs(quant: dict):
    """(weight, activation, attention-input) specs of the `quant` group; one error line for a bad setting."""
    try:
        return (*specs_from_quant_cfg(quant), attention_spec(quant))
    except ValueError as exc:
        raise PipelineError(f"quant: {exc}") from exc


def pick_device(name: str) -> torch.device:
    place = env_world()
    if place.active and name in ("auto", "cuda") and torch.cuda.is_available():
        if place.local_rank >= torch.cuda.device_count():
            raise PipelineError(f"torchrun started local rank {place.local_rank} but this node has "
                                f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node <= the GPUs per node")
        return torch.device("cuda", place.local_rank)  # one rank per GPU
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise PipelineError(f"pipeline.device={name} is not a device name; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise PipelineError(f"pipeline.device={name}: only cpu and cuda are supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"pipeline.device={name} but no CUDA device is available; use pipeline.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"pipeline.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them or auto")
    return device


def validate_model_fit(cfg: dict, config) -> None:
    group = cfg["quant"].get("group_size")
    if group:
        for width in (config.hidden_size, config.intermediate_size):
            if width % group:
                raise PipelineError(
                    f"quant.group_size={group} does not divide the layer width {width} of model={cfg['model']['name']}; "
                    "use a divisor of both hidden and intermediate size, or null"
                )
    context = getattr(config, "max_position_embeddings", None)
    for key, value in (("calibrate.seq_len", cfg["calibrate"]["seq_len"]), ("eval.seq_len", cfg["eval"]["seq_len"])):
        if context and value > context:
            raise PipelineError(f"{key}={value} exceeds the model's context of {context} tokens; lower it")


def resolved_config(cfg: DictConfig) -> dict:
    """The composed configuration as a plain dict, checked against the schema (types, ranges, unknown keys)."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise PipelineError(f"{exc.full_key} must be set (it is ???): add {exc.full_key}=VALUE") from exc
    validate_schema(c)
    return c


@dataclass
class Checked:
    source: ModelSource
    specs: tuple  # weight, activation, attention-input QuantSpec
    device: torch.device
    model_config: object
    cache: ArtifactCache
    model_id: str
    budget: dict  # the memory the run may use (qllm_pipeline.core.plan.memory_budget)


def check_before_loading(c: dict) -> Checked:
    """Everything that can be refused before a weight is read: settings, stages, device, lm-eval task names, the
    model's config (architecture, widths, context), the cache directory; then the model's identity for the keys."""
    from qllm_pipeline.stages import STAGES

    specs = quant_specs(c["quant"])
    source = ModelSource.from_config(c["model"])
    validate_config(c, STAGES)
    device = pick_device(c["pipeline"]["device"])
    if c["eval"]["tasks"] and "evaluate" in c["pipeline"]["stages"]:
        from qllm_pipeline.evaluation.zeroshot import check_task_names

        check_task_names([str(t) for t in c["eval"]["tasks"]])
    check_datasets(c)
    config = load_config(source)
    validate_model_fit(c, config)
    for name in c["pipeline"]["stages"]:
        if STAGES[name].enabled(c):
            STAGES[name].preflight(c, config)  # e.g. Hadamard sizes
    budget = check_memory(c, source, config, device)
    check_ranks(c)
    cache = ArtifactCache(c["pipeline"]["cache_dir"])  # refuses an unwritable directory
    model_id = model_key(source, digest_memo_dir(source, cache.root / ".file_digests"))
    return Checked(source, specs, device, config, cache, model_id, budget)


def check_memory(c: dict, source: ModelSource, config, device: torch.device) -> dict:
    """The run's memory plan against the device's and the host's memory (or pipeline.device_memory_gb /
    host_memory_gb), before any weight is read: a plan that does not fit is refused, unless pipeline.memory_check is
    false. Returns the budget (the stages size their host caches by it)."""
    from qllm_pipeline.core.plan import arch_from_config, check_fits, format_run_plan, memory_budget, plan_for

    budget = memory_budget(c, device)
    plan = plan_for(c, source, arch_from_config(config), device.type, budget["host"])
    log.info("%s", format_run_plan(c, plan, budget))
    if c["pipeline"]["memory_check"]:
        check_fits(plan, budget)
    elif plan["host_peak_bytes"] > budget["host"] or (budget["device"] or plan["device_peak_bytes"]) < plan["device_peak_bytes"]:
        log.warning("the memory plan does not fit (pipeline.memory_check=false: running anyway)")
    return budget


def check_ranks(c: dict) -> None:
    """Under torchrun, every rank must own at least one batch of calibration windows."""
    place = env_world()
    planned = c["pipeline"].get("ranks")
    if planned is not None and planned != place.size:
        raise PipelineError(f"pipeline.ranks={planned} but this job has {place.size} rank(s) (torchrun's --nproc_per_node); "
                            "pipeline.ranks is for pipeline.plan_only: leave it null for a run")
    batches = -(-int(c["calibrate"]["n_samples"]) // int(c["pipeline"]["batch_size"]))
    if place.size > batches:
        raise PipelineError(f"{place.size} ranks but calibrate.n_samples={c['calibrate']['n_samples']} with "
                            f"pipeline.batch_size={c['pipeline']['batch_size']} makes {batches} batch(es) of windows; "
                            "each rank needs one: start fewer ranks, or raise calibrate.n_samples or lower the batch size")


def check_datasets(c: dict) -> None:
    """Load every corpus the run will read (calibration, evaluation) now, so a missing dataset fails before the
    weights are read rather than after the block walk (loaded corpora are kept for the stages)."""
    from qllm_pipeline.data.corpora import load_corpus
    from qllm_pipeline.data.windows import HELDOUT

    names = {c["data"]["name"]} | {d for d in c["eval"]["datasets"] if d != HELDOUT and "evaluate" in c["pipeline"]["stages"]}
    for name in sorted(names):
        load_corpus(name, c["data"])


def run(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    adopt_submitit_tasks()  # a multi-task submitit job: its tasks are the ranks
    c = resolved_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if c["pipeline"]["plan_only"]:
        from qllm_pipeline.core.plan import model_config, print_plan
        from qllm_pipeline.stages import STAGES

        quant_specs(c["quant"])
        source = ModelSource.from_config(c["model"])
        config = model_config(c["model"], source)
        check_config(config, source.name)  # a plan is only printed for a run that would start
        for name in c["pipeline"]["stages"]:
            if STAGES[name].enabled(c):
                STAGES[name].preflight(c, config)
        plan = print_plan(c, source)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))  # what benchmarks/memory.py checks against measurement
        return plan
    checked = check_before_loading(c)
    source, cache, device = checked.source, checked.cache, checked.device
    weight_spec, act_spec, attn_spec = checked.specs
    model_id = checked.model_id
    from qllm_pipeline.stages import STAGES

    world = init_from_env(device)
    if world.active:
        cache = SharedCache(cache.root, world)
        if not world.is_writer:  # rank 0 reports for the job
            logging.getLogger("qllm_pipeline").setLevel(logging.WARNING)
        log.info("data parallel: %d ranks (%s)", world.size, torch.distributed.get_backend())
    model = load_model(source, model_id)
    tokenizer = load_tokenizer(source, model_id)
    # What exists now (modules, the model's skeleton) lives for the run: keep it out of the cycle collector, so the
    # per-block collections (Runner.walk_blocks) take milliseconds instead of half a second.
    gc.collect()
    gc.freeze()
    # One W&B run per job: rank 0 logs.
    tracker = make_tracker(c["logger"] if world.is_writer else {"kind": "none"}, c, str(run_dir), group=_sweep_group(),
                           name=run_dir.name)
    ctx = RunContext(
        cfg=c,
        model=model,
        tokenizer=tokenizer,
        cache=cache,
        model_id=model_id,
        run_dir=run_dir,
        device=device,
        weight_spec=weight_spec,
        act_spec=act_spec,
        attn_spec=attn_spec,
        tracker=tracker,
        progress=bool(c["pipeline"]["progress"]) and world.is_writer,
        memory_budget=checked.budget,
        world=world,
    )
    runner = Runner(ctx, STAGES)
    results = runner.run()
    results["stages"] = runner.stage_table()
    if ctx.checkpoint is not None:
        results["checkpoint"] = ctx.checkpoint
    results["meta"] = {
        "model": source.name,
        "quant": c["quant"]["name"],
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
        "keys": ctx.keys,
        "overrides": list(HydraConfig.get().overrides.task),
        # The CPU kernels' instruction set: quantized numbers move with it (RTN W4A4 on SmolLM2: 1198.662 with
        # AVX2 kernels, 1216.387 with AVX-512 ones, FP the same), so a run is compared on the same kind of CPU
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # ... and with the CPU itself (MKL and oneDNN pick kernels per vendor and model: the default job's rows moved
        # by 2 % between two AVX-512 machines) and with the thread count (summation order)
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "ranks": world.size,
        "collective_seconds": collective_seconds(),  # rank 0's: data moved and waits for the other ranks
    }
    if not world.is_writer:
        return results
    text = write_results(run_dir, results)
    if c["pipeline"]["plots"]:
        from qllm_pipeline.core.run_report import write_plots  # matplotlib: imported only when plots are drawn

        title = f"{source.name} {c['quant']['name']}"
        for png in write_plots(run_dir, runner.artifacts, results, title, family_of(model)):
            tracker.log_image(png.stem, str(png))
    print(text)
    tracker.summary({f"ppl/{d}/{v}": p for d, row in results.get("ppl", {}).items() for v, p in row.items()})
    tracker.summary({f"stage/{s['stage']}/{k}": s[k] for s in results["stages"] for k in ("seconds", "computed", "cached")})
    tracker.finish()
    log.info("results written to %s", run_dir)
    return results


def _sweep_group() -> str | None:
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode.name == "MULTIRUN" else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except PipelineError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. the run directory's disk filled up; the cache stays valid (atomic artifacts)
        if not is_disk_full(exc):
            raise
        fail(f"no space left on the device ({exc.filename or 'run directory'}); free disk space and run again: "
             "finished artifacts are kept and the run resumes")
    finally:
        release_freed_memory()  # the next job of a multirun starts from a low RSS


def main() -> None:
    """Console entry point (`python -m qllm_pipeline`, `qllm-pipeline`)."""
    try:
        check_command_line(sys.argv[1:])
    except PipelineError as exc:
        fail(str(exc))
    place = env_world()
    if not place.is_writer:
        # Rank 0 owns the run directory; the others' Hydra output goes to a folder of their own, removed at exit (or,
        # after a SIGKILL, by the next rank that starts on this machine).
        import atexit
        import shutil
        import tempfile

        from qllm_pipeline.core.scratch import scratch_prefix

        scratch = tempfile.mkdtemp(prefix=scratch_prefix(str(place.rank)))
        atexit.register(shutil.rmtree, scratch, True)
        sys.argv += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]
    hydra_main()
