"""Hydra entry point. Bad input ends with one `error: ...` line on stderr and exit code 2."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .attention import attention_spec
from .cache import ArtifactCache
from .errors import PipelineError
from .export import specs_from_quant_cfg
from .memory import release_freed_memory
from .model_loading import ModelSource, load_config, load_model, load_tokenizer
from .report import write_results
from .run_report import write_plots
from .runner import RunContext, Runner, peak_rss_mib, validate_config
from .tracking import make_tracker

log = logging.getLogger("qllm_pipeline")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_group_overrides(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Refuse `group=option` overrides naming a missing option, with one line (Hydra's own message is a page)."""
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
                fail(f"unknown {key}={option}; choose one of {choices} (or add conf/{key}/{option}.yaml)")


def quant_specs(quant: dict):
    """(weight, activation, attention-input) specs of the `quant` group; one error line for a bad setting."""
    try:
        return (*specs_from_quant_cfg(quant), attention_spec(quant))
    except ValueError as exc:
        raise PipelineError(f"quant: {exc}") from exc


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"pipeline.device={name} but no CUDA device is available; use pipeline.device=cpu or auto")
    return torch.device(name)


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


def run(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    c = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    weight_spec, act_spec, attn_spec = quant_specs(c["quant"])
    source = ModelSource.from_config(c["model"])
    if c["pipeline"]["plan_only"]:
        from .plan import print_plan

        return print_plan(c, source)
    from stages import STAGES

    validate_config(c, STAGES)
    device = pick_device(c["pipeline"]["device"])
    config = load_config(source)
    validate_model_fit(c, config)  # before reading any weights
    for name in c["pipeline"]["stages"]:
        if STAGES[name].enabled(c):
            STAGES[name].preflight(c, config)  # e.g. the LRC memory plan, Hadamard sizes
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    tracker = make_tracker(c["logger"], c, str(run_dir), group=_sweep_group(), name=run_dir.name)
    ctx = RunContext(
        cfg=c,
        model=model,
        tokenizer=tokenizer,
        cache=ArtifactCache(c["pipeline"]["cache_dir"]),
        run_dir=run_dir,
        device=device,
        weight_spec=weight_spec,
        act_spec=act_spec,
        attn_spec=attn_spec,
        tracker=tracker,
        progress=bool(c["pipeline"]["progress"]),
    )
    runner = Runner(ctx, STAGES)
    results = runner.run()
    results["stages"] = runner.stage_table()
    results["meta"] = {
        "model": source.name,
        "quant": c["quant"]["name"],
        "device": str(device),
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
        "keys": ctx.keys,
        "overrides": list(HydraConfig.get().overrides.task),
    }
    text = write_results(run_dir, results)
    for png in write_plots(run_dir, runner.artifacts, results, f"{source.name} {c['quant']['name']}"):
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
    finally:
        release_freed_memory()  # the next job of a multirun starts from a low RSS


def main() -> None:
    """Console entry point (`python -m qllm_pipeline`, `qllm-pipeline`)."""
    check_group_overrides(sys.argv[1:])
    hydra_main()
