"""Weight rounding of a block's projections when it is fused: round-to-nearest or GPTQ, chosen by config
(`quant.weight_algorithm`). The rounding sees the merged weight T(W) + B·A (after the input transforms and the
low-rank correction), so it composes with every method.

GPTQ needs each projection's Hessian from the inputs it really sees: the block's inputs on the quantized stream,
through the input transforms (online Hadamard, reassembly), before the activation quantizer. Projections are rounded
in four groups in forward order (q/k/v, o, gate/up, down; members of a group share one input, so one Hessian), and
each group's inputs are collected after the groups before it were rounded, so o_proj sees the rounded q/k/v, etc.

With low-rank correction, GPTQ runs first (`gptq_base_block`): its rounded weights become the frozen base that LRC
refines on GPTQ's own grid, so training starts from GPTQ's error and the final Q(Ŵ + B·A) is what it trained.
Rounding the merged weight afterwards instead would throw away what the correction learned about RTN's errors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qllm_pipeline.core.distributed import world
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.settings import check_settings, setting
from qllm_pipeline.methods.gptq import HessianAccumulator, fp_target_weight, gptq_weight_codes, inverse_factor
from qllm_pipeline.model.arch import block_family
from qllm_pipeline.quantized.blocks import quant_linears
from qllm_pipeline.quantized.quantizer import weight_codes, weight_codes_with_params

# in GPTQ's cache keys (GPTQRounding.key): 2 = float32 Hessian sums, in-place factor; 3 = float64 running sums of
# float32 products (the same H however the batches are grouped: ranks of a torchrun job)
GPTQ_ARITHMETIC_VERSION = 3


@dataclass
class GPTQConfig:
    """GPTQ weight rounding (when quant.weight_algorithm=gptq): Hessians from each projection's inputs on the quantized
    stream (after its input transforms), projections rounded in forward order within each block."""

    damp: float = setting(0.01, lo=0, hi=1, hi_open=True)  # dampening, as a fraction of the Hessian's mean diagonal
    block_size: int = setting(128, lo=1)  # columns per lazy update
    act_order: bool = True  # columns in order of decreasing Hessian diagonal (static groups with group_size)
    # search each row's (group's) range (shrink <= 20 %) for the least rounding error instead of min-max; chosen on
    # held-out calibration windows
    clip: bool = True
    # What the rounded layer's output should match, on the inputs it really sees: 0 = the layer's own FP weight
    # (GPTQ), 1 = the FP model's layer on the FP stream (GPTAQ's asymmetric calibration; worse on held-out windows
    # here: benchmarks/results/heldout_gptq_fp_target.md), between = a blend.
    fp_target: float = setting(0.0, lo=0, hi=1, hint="a number in [0, 1]: 0 = GPTQ, 1 = GPTAQ")

    def __post_init__(self):
        check_settings(self, "gptq")


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) / 2 = the mean over calibration tokens of ||x Wᵀ - x Ŵᵀ||² (H = 2/N Σ x xᵀ), in the
    Hessian's precision (a diagnostic: the report of RTN's and GPTQ's layer errors)."""
    delta = (weight.to(hessian.dtype) - rounded.to(hessian.dtype)).to(hessian.device)
    return float(((delta @ hessian) * delta).sum(dtype=torch.float64) / 2)


class _InputsCollected(Exception):
    """Raised by the input hook to stop a block's forward once the group's inputs are recorded."""


@torch.no_grad()
def gptq_round_block(block: nn.Module, run_block, inputs: torch.Tensor, device, batch_size: int, cfg: GPTQConfig, apply,
                     fp: tuple[nn.Module, torch.Tensor] | None = None) -> dict:
    """GPTQ-round every QuantLinear of `block` (on `device`) group by group; `apply(qlinear, codes)` installs each
    result before the next group's inputs are collected. Returns, per projection, the layer output error (on the
    Hessian's inputs) of RTN and of GPTQ.

    With `cfg.fp_target` > 0, `fp` = (the FP block, its inputs on the FP stream) gives each projection's FP inputs
    (paired token by token with `inputs`), and the weight rounded is `gptq.fp_target_weight`'s: what best reproduces
    the FP layer's output from the inputs the quantized layer sees."""
    from qllm_pipeline.quantized.quantizer import dequantize_weight

    if cfg.fp_target and fp is None:
        raise ValueError("gptq.fp_target > 0 needs the FP block and its FP-stream inputs")
    qlinears = quant_linears(block)
    fp_block, fp_stream = fp if cfg.fp_target else (None, None)
    if fp_block is not None:
        fp_block.to(device)
    report = {}
    for group in block_family(block).input_groups:  # members of a group share one input, so one Hessian
        first = qlinears[group[0]]
        acc = HessianAccumulator(first.effective_in_features)
        for start in range(0, inputs.shape[0], batch_size):
            x = first.transform_input(_input_of(block, first, run_block, inputs[start : start + batch_size], device))
            x_fp = None
            if fp_block is not None:
                # The FP layer's input through the quantized layer's transforms: the same basis (reassembly included).
                raw = _input_of(fp_block, fp_block.get_submodule(group[0]), run_block, fp_stream[start : start + batch_size], device)
                x_fp = first.transform_input(raw.to(x.dtype))
            acc.add(x, x_fp)
        acc.all_reduce(world())  # under torchrun: the Hessian of every rank's windows
        cross = acc.cross() if fp_block is not None else None
        # Once per group (its members share the input). On an accelerator the Hessian waits in host memory meanwhile:
        # the device holds the float64 factorization and its float32 result, not the Hessian beside them.
        with acc.parked() as host_hessian:
            factor = inverse_factor(host_hessian, cfg.damp, cfg.act_order, device=device)
        hessian = acc.hessian()
        for name in group:
            ql = qlinears[name]
            merged = ql.merged_weight().detach().float()
            target = merged
            if cross is not None:
                # Blend the cross term toward H: fp_target=α gives W* for the target α·X_fp + (1-α)·X.
                blended = cfg.fp_target * cross + (1 - cfg.fp_target) * hessian
                target = fp_target_weight(merged, hessian, blended, cfg.damp)
            codes = gptq_weight_codes(target, hessian, ql.weight_spec, cfg.damp, cfg.block_size, cfg.act_order, cfg.clip,
                                      factor=factor)
            rtn = dequantize_weight(**weight_codes(merged, ql.weight_spec))
            report[name] = {
                "rtn_error": output_error(merged, rtn, hessian),
                "gptq_error": output_error(merged, dequantize_weight(**codes), hessian),
            }
            apply(ql, {k: v.to(ql.weight.device) for k, v in codes.items()})
    if fp_block is not None:
        fp_block.to("cpu")
    return report


def _input_of(block: nn.Module, module: nn.Module, run_block, x: torch.Tensor, device) -> torch.Tensor:
    """`module`'s raw input (before its own transforms) when `block` runs on `x`; the forward stops there."""
    captured = []

    def hook(_, args):
        captured.append(args[0].detach())
        raise _InputsCollected

    handle = module.register_forward_pre_hook(hook)
    try:
        run_block(block, x.to(device, block_dtype(block)))
    except _InputsCollected:
        pass
    finally:
        handle.remove()
    return captured[0]


def gptq_fuse_block(block: nn.Module, run_block, inputs: torch.Tensor, device, batch_size: int, cfg: GPTQConfig,
                    fp=None) -> dict:
    """Fuse every projection with its GPTQ-rounded weight."""
    return gptq_round_block(block, run_block, inputs, device, batch_size, cfg, lambda ql, codes: ql.fuse(codes=codes), fp)


def gptq_base_block(block: nn.Module, run_block, inputs: torch.Tensor, device, batch_size: int, cfg: GPTQConfig,
                    fp=None) -> dict:
    """Make every projection's GPTQ-rounded weight its frozen base (for LRC to refine on the same grid)."""
    return gptq_round_block(block, run_block, inputs, device, batch_size, cfg, lambda ql, codes: ql.set_base(codes), fp)


def base_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The rounded bases of a block set by `gptq_base_block`, as `<name>.{codes,scale,zero}` (codes as small ints)."""
    out = {}
    for name, ql in quant_linears(block).items():
        codes = weight_codes_with_params(ql.weight.detach(), ql.base_qparams["scale"], ql.base_qparams["zero"], ql.weight_spec)
        out.update({f"{name}.codes": codes["codes"].to(_code_dtype(ql.weight_spec)), f"{name}.scale": codes["scale"],
                    f"{name}.zero": codes["zero"]})
    return out


def _code_dtype(spec) -> torch.dtype:
    if spec.bits <= 8:
        return torch.int8 if spec.symmetric else torch.uint8
    return torch.int32


def load_base_tensors(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, ql in quant_linears(block).items():
        ql.set_base({"codes": tensors[f"{name}.codes"].float(), "scale": tensors[f"{name}.scale"], "zero": tensors[f"{name}.zero"]})


def block_dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


# ------------------------------------------------------------------------------------------------------ the registry
class WeightRounding:
    """One way a block's weights are rounded to their grid (`quant.weight_algorithm`), as the stages see it: its
    settings, what it puts in the cache keys of the stages that round (train_lowrank, fuse), whether it reads the FP
    stream, and `round_block`. Round-to-nearest is the default: `round_block` leaves it to QuantLinear.fuse."""

    name = "rtn"
    label: str | None = None  # the part it adds to the method's name in results ("gptq")
    reads_inputs = False  # rounds from the block's inputs (GPTQ's Hessians; the plan counts them), not weight by weight

    def validate(self, cfg: dict) -> None:
        """Refuse bad settings before anything is read (one PipelineError)."""

    def key(self, cfg: dict) -> dict:
        """Its settings as they go into cache keys; {} for none (so round-to-nearest's keys are the keys of runs
        made before the registry)."""
        return {}

    def needs_fp_stream(self, cfg: dict) -> bool:
        return False

    def round_block(self, block: nn.Module, run_block, inputs: torch.Tensor, device, batch_size: int, cfg: dict,
                    fp=None, as_base: bool = False) -> dict | None:
        """Round every projection of `block` from its inputs: fused (`as_base` false) or as the frozen base LRC refines
        (`as_base` true), and return a report. Only for roundings that `reads_inputs`; round-to-nearest happens in
        QuantLinear.fuse."""
        raise NotImplementedError(f"{self.name} rounds each weight at fuse time, not from the block's inputs")


class GPTQRounding(WeightRounding):
    name = "gptq"
    label = "gptq"
    reads_inputs = True

    def config(self, cfg: dict) -> GPTQConfig:
        try:
            return GPTQConfig(**cfg["gptq"])
        except (TypeError, ValueError) as exc:
            raise PipelineError(str(exc)) from exc

    def validate(self, cfg: dict) -> None:
        self.config(cfg)

    def key(self, cfg: dict) -> dict:
        """fp_target at its default 0 is left out; the arithmetic's version is in (see GPTQ_ARITHMETIC_VERSION: a block
        rounded by the earlier arithmetic can differ in a code at a rounding tie, so it is never reused)."""
        settings = {k: v for k, v in cfg["gptq"].items() if not (k == "fp_target" and not v)}
        return {"gptq": {**settings, "arithmetic": GPTQ_ARITHMETIC_VERSION}}

    def needs_fp_stream(self, cfg: dict) -> bool:
        """Matching the FP model's layers (gptq.fp_target > 0) reads each block's FP-stream inputs."""
        return bool(cfg["gptq"].get("fp_target") or 0)

    def round_block(self, block, run_block, inputs, device, batch_size, cfg, fp=None, as_base=False) -> dict:
        step = gptq_base_block if as_base else gptq_fuse_block
        return step(block, run_block, inputs, device, batch_size, self.config(cfg), fp=fp)


WEIGHT_ROUNDINGS: dict[str, WeightRounding] = {r.name: r for r in (WeightRounding(), GPTQRounding())}
WEIGHT_ALGORITHMS = tuple(WEIGHT_ROUNDINGS)


def weight_rounding(cfg: dict) -> WeightRounding:
    """The rounding `quant.weight_algorithm` names (round-to-nearest when unset)."""
    name = cfg["quant"]["weight_algorithm"]
    if name not in WEIGHT_ROUNDINGS:
        raise PipelineError(f"quant.weight_algorithm={name!r} is not one of {list(WEIGHT_ALGORITHMS)}")
    return WEIGHT_ROUNDINGS[name]
