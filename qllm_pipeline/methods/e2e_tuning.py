"""End-to-end tuning of a fused quantized model's quantization parameters (EfficientQAT's E2E-QP, with a
distillation loss): the integer weight codes stay fixed, and what is trained is each weight row's (group's) scale,
each projection's activation clip ratio and optionally the RMSNorm weights, so that the quantized model's
next-token distribution matches the full-precision model's (KL divergence, per token) on the calibration windows.

Block-wise training (LRC) matches each block's output; the errors it leaves compound through the model. Tuning
the few parameters that set the quantization grids against the model's final output undoes part of that, and
cannot overfit much: per projection a scale per row and one clip ratio. The result is an ordinary fused model
(new scales, clip ratios and norms; the same codes), so every export and runtime takes it unchanged.

Neither model is held whole. The FP teacher is its final hidden states on the calibration windows (computed once,
block by block, by the caller), turned into logits a chunk of tokens at a time through the FP head. The trained
quantities live in host memory (`TunedParams`); how a batch's loss and gradients are computed is an executor's job
(qllm_pipeline.methods.e2e_streaming: one block on the device at a time, or every block at once as a fast path).

The stage keeps the best state: the KL on the calibration windows is measured before training and after every
epoch (no update while measuring), and the parameters of the lowest one are kept, so tuning never makes the model
worse on the windows it sees; when no epoch improves on the untuned model, nothing is changed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from qllm_pipeline.core.distributed import Ownership, world
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.settings import check_settings, setting
from qllm_pipeline.methods.lowrank import ACT_CLIP_MIN
from qllm_pipeline.model.arch import Family, block_family
from qllm_pipeline.quantized.blocks import get_submodule, quant_linears
from qllm_pipeline.quantized.quantizer import QuantSpec, per_bit_width

E2E_MODES = ("streamed", "whole")
HEAD_CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk of tokens (SmolLM2's 49k vocabulary: 1365 tokens)


# AdamW moves each scale by about this fraction per step, per weight bit width: 4 and 6 chosen on held-out windows
# (benchmarks/results/heldout_tune_e2e_scale_lr.md; a finer grid wants a smaller step); 8 not swept, the halving from
# 4 to 6 bits continued. A width not listed takes the nearest listed one's rate.
SCALE_LR = {4: 4e-3, 6: 2e-3, 8: 1e-3}


@dataclass
class E2EConfig:
    """The settings of end-to-end tuning, as they act in one run (the conf group tune_e2e may give scale_lr per bit
    width: qllm_pipeline.core.config.TuneE2EConfig)."""

    epochs: int = setting(2, lo=1)
    batch_size: int = setting(1, lo=1)  # calibration windows per step
    scale_lr: float = setting(SCALE_LR[4], lo=0, hint="a finite number >= 0 (0: scales not tuned)")
    # for the activation clip ratios (kept in [0.5, 1]); 0 = fixed
    act_clip_lr: float = setting(5e-3, lo=0, hint="a finite number >= 0 (0: clip ratios not tuned)")
    norm_lr: float = setting(0.0, lo=0, hint="a finite number >= 0 (0: norms not tuned)")  # the norm weights; 0 = fixed
    seed: int = 0  # order of the windows
    # streamed: one block on the device at a time; whole: every block at once (faster, needs room for the whole
    # model's activations: the memory plan says whether it fits)
    mode: str = setting("streamed", choices=E2E_MODES)

    def __post_init__(self):
        check_settings(self, "tune_e2e")
        if not (self.scale_lr or self.act_clip_lr or self.norm_lr):
            raise PipelineError("tune_e2e: scale_lr, act_clip_lr and norm_lr are all 0, so nothing would be tuned; "
                                "set one of them or leave the tune_e2e stage out")


def resolved_settings(cfg: dict) -> dict:
    """The tune_e2e settings of a run's config (a plain dict) as they act, without `mode`: `scale_lr` and `batch_size`
    may be maps {weight bits: value} (a recipe's value per bit width, each chosen on held-out windows); here each is
    the value of this run's weight bit width. The stage's key, its run and the memory plan all read them from here."""
    names = [f.name for f in fields(E2EConfig) if f.name != "mode"]
    settings = {k: cfg["tune_e2e"][k] for k in names if k in cfg["tune_e2e"]}
    scale_lr, batch_size, wbits = settings.get("scale_lr"), settings.get("batch_size"), cfg["quant"].get("wbits")
    if isinstance(scale_lr, dict):  # a width it does not list takes the nearest listed width's rate
        settings["scale_lr"] = 0.0 if wbits is None else per_bit_width(scale_lr, wbits)  # no weight grid: no scales
    if isinstance(batch_size, dict):  # no weight grid: the smallest listed width's size
        width = wbits if wbits is not None else min(map(int, batch_size))
        settings["batch_size"] = int(per_bit_width(batch_size, width))
    return settings


class TunedParams:
    """What tuning trains, for every block, in host memory as float32 leaves: `<proj>.scale_delta` (the row's scale
    is multiplied by 1 + delta; the codes stay), `<proj>.act_clip` and `<norm>.weight`. AdamW steps these; a block
    being run gets device copies (`attach`) whose gradients are added back here (`collect`)."""

    def __init__(self, fused: Iterable[dict[str, torch.Tensor]], cfg: E2EConfig, weight_spec: QuantSpec,
                 act_spec: QuantSpec, family: Family):
        self.cfg = cfg
        self.blocks: list[dict[str, torch.Tensor]] = []
        for tensors in fused:
            values = {}
            for name in family.linears:
                if cfg.scale_lr and weight_spec.enabled and f"{name}.scale" in tensors:
                    values[f"{name}.scale_delta"] = torch.zeros_like(tensors[f"{name}.scale"], dtype=torch.float32)
                if cfg.act_clip_lr and act_spec.enabled:  # from the ratio LRC learned, if it did
                    clip = tensors.get(f"{name}.act_clip", torch.tensor(float(act_spec.clip_ratio)))
                    values[f"{name}.act_clip"] = torch.tensor(float(clip), dtype=torch.float32)
            if cfg.norm_lr:
                values.update({f"{n}.weight": tensors[f"{n}.weight"].float().clone() for n in family.norms})
            for value in values.values():
                value.requires_grad_(True)
            self.blocks.append(values)

    def param_groups(self) -> list[dict]:
        """AdamW's groups: scales, clip ratios, norms, each at its learning rate (empty ones left out)."""
        by_field = {"scale_delta": [], "act_clip": [], "weight": []}
        for values in self.blocks:
            for key, value in values.items():
                by_field[key.rsplit(".", 1)[1]].append(value)
        lrs = {"scale_delta": self.cfg.scale_lr, "act_clip": self.cfg.act_clip_lr, "weight": self.cfg.norm_lr}
        return [{"params": params, "lr": lrs[field]} for field, params in by_field.items() if params]

    def leaves(self) -> list[torch.Tensor]:
        """Every tuned value, in one fixed order (the order the ranks of a data-parallel job sum gradients in)."""
        return [p for group in self.param_groups() for p in group["params"]]

    def clips(self) -> list[torch.Tensor]:
        return [v for values in self.blocks for k, v in values.items() if k.endswith(".act_clip")]

    def attach(self, index: int, block: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Put block `index`'s current values into the fused `block` as trainable parameters (on the block's device,
        in its dtypes); returns (parameter, host leaf) pairs. With scale deltas 0 and the clip ratios the block has,
        the block computes exactly what it did."""
        pairs = []
        qlinears = quant_linears(block)
        for key, value in self.blocks[index].items():
            name, field = key.rsplit(".", 1)
            if field == "scale_delta":
                qlinears[name].add_scale_tuning()
                param = qlinears[name].scale_delta
            elif field == "act_clip":
                qlinears[name].add_act_clip()
                param = qlinears[name].act_clip
            else:
                param = get_submodule(block, name).weight
            param.data = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
            param.requires_grad_(True)
            pairs.append((param, value))
        return pairs

    @staticmethod
    def sync(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Copy the host values into attached parameters (after an optimizer step)."""
        with torch.no_grad():
            for param, value in pairs:
                param.copy_(value)

    @staticmethod
    def collect(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        """Add the attached parameters' gradients to the host leaves' (and clear them)."""
        for param, value in pairs:
            if param.grad is None:
                continue
            grad = param.grad.to(device=value.device, dtype=value.dtype)
            value.grad = grad if value.grad is None else value.grad + grad
            param.grad = None

    @staticmethod
    def detach(block: nn.Module) -> None:
        """Remove the tuning from a block kept for reuse (the next `attach` sets every value again)."""
        for ql in quant_linears(block).values():
            ql.scale_delta = None
            ql.act_clip = None
        for name in block_family(block).norms:
            get_submodule(block, name).weight.requires_grad_(False)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of every value, flat: `<block>.<key>`."""
        return {f"{i}.{k}": v.detach().clone() for i, values in enumerate(self.blocks) for k, v in values.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, values in enumerate(self.blocks):
                for key, value in values.items():
                    value.copy_(state[f"{i}.{key}"])

    def tuned_tensors(self, index: int, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Block `index`'s fused tensors that tuning changed, as the fused block stores them: `<proj>.scale` (the
        codes' scale times 1 + delta), `<proj>.act_clip` and the norm weights."""
        out = {}
        for key, value in self.blocks[index].items():
            name, field = key.rsplit(".", 1)
            if field == "scale_delta":
                scale = fused[f"{name}.scale"]
                out[f"{name}.scale"] = scale * (1 + value.detach().to(scale.dtype))
            elif field == "act_clip":
                out[key] = torch.tensor(float(value.detach()), dtype=torch.float32)
            else:
                out[key] = value.detach().to(fused[key].dtype)
        return out


class Head:
    """Hidden states to logits: a model's final norm, then its lm_head."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        self.norm, self.lm_head = norm, lm_head
        self.vocab_size = lm_head.weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def to(self, device) -> "Head":
        self.norm.to(device)
        self.lm_head.to(device)
        return self


def head_kl(hidden: torch.Tensor, target: torch.Tensor, student: Head, teacher: Head, backward: bool = False) -> float:
    """Mean over tokens of KL(teacher ‖ student) of the next-token distributions, from the final hidden states of
    the student (`hidden`) and of the FP teacher (`target`), [batch, seq, hidden] each. The logits exist for a chunk
    of tokens at a time (HEAD_CHUNK_BYTES), so a large vocabulary (Llama-3: 128k) never has a whole batch's. With
    `backward`, the gradient with respect to `hidden` (a leaf) is accumulated in `hidden.grad`, chunk by chunk."""
    h, t = hidden.flatten(0, -2), target.flatten(0, -2).to(hidden.device)
    tokens, total = h.shape[0], 0.0
    chunk = max(1, HEAD_CHUNK_BYTES // (student.vocab_size * 4))
    for start in range(0, tokens, chunk):
        with torch.no_grad():
            t_log = torch.log_softmax(teacher(t[start : start + chunk]).float(), dim=-1)
        s_log = torch.log_softmax(student(h[start : start + chunk]).float(), dim=-1)
        kl = nn.functional.kl_div(s_log, t_log, log_target=True, reduction="sum") / tokens
        if backward:
            kl.backward()
        total += float(kl.detach())
    return total


class Executor:
    """How a batch's KL and gradients are computed (qllm_pipeline.methods.e2e_streaming)."""

    def kl(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        """The KL of a batch, no gradient."""
        raise NotImplementedError

    def kl_and_grads(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        """The KL of a batch; its gradients added to the TunedParams' leaves."""
        raise NotImplementedError


class Checkpoints:
    """Where `tune` keeps its state after each epoch, so a killed run resumes at the last finished epoch."""

    def load(self) -> dict | None:
        return None

    def save(self, state: dict) -> None:
        pass


def tune(executor: Executor, params: TunedParams, windows: torch.Tensor, teacher: torch.Tensor, cfg: E2EConfig,
         progress: bool = True, checkpoints: Checkpoints | None = None) -> dict:
    """Train `params` toward the teacher's final hidden states `teacher` [n, seq, hidden] on `windows` [n, seq]:
    AdamW with a linear decay to 0, clip ratios kept in [ACT_CLIP_MIN, 1], one seeded window order per epoch. The
    KL over all windows (mean of the batches' means, no update) is measured before training and after each epoch;
    `params` end at the best of those states. Returns the KLs measured, the mean training KL of each epoch, the best
    epoch (0: the untuned model) and the number of steps."""
    checkpoints = checkpoints or Checkpoints()
    # Under torchrun every rank holds all windows and the same state; each computes the windows of its shard of
    # every step and the gradients are summed: the same updates as one process.
    owned = Ownership.of(world(), world().shard(windows.shape[0], cfg.batch_size), windows.shape[0])
    optimizer = torch.optim.AdamW(params.param_groups(), weight_decay=0.0)
    batches = math.ceil(windows.shape[0] / cfg.batch_size)
    steps = cfg.epochs * batches
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    resumed = checkpoints.load()
    if resumed is not None:
        params.load(resumed["params"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        stats, best = resumed["stats"], resumed["best"]
    else:
        stats = {"kl_before": measure(executor, windows, teacher, cfg.batch_size), "kl_measured": [],
                 "kl_per_epoch": [], "best_epoch": 0, "steps": steps, "epochs_done": 0}
        best = params.state()
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, initial=stats["epochs_done"] * batches, desc="tune_e2e", disable=not progress)
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(windows.shape[0], generator=generator)  # drawn for every epoch: resumed ones too
            if epoch < stats["epochs_done"]:
                continue
            losses = []
            for idx in order.split(cfg.batch_size):
                optimizer.zero_grad(set_to_none=True)
                losses.append(_step_grads(executor, params, windows, teacher, idx, owned))
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for clip in params.clips():
                        clip.clamp_(ACT_CLIP_MIN, 1.0)
                bar.update(1)
                bar.set_postfix_str(f"kl {losses[-1]:.4f}")
            stats["kl_per_epoch"].append(sum(losses) / len(losses))
            stats["kl_measured"].append(measure(executor, windows, teacher, cfg.batch_size))
            if stats["kl_measured"][-1] < min([stats["kl_before"], *stats["kl_measured"][:-1]]):
                stats["best_epoch"], best = epoch + 1, params.state()
            stats["epochs_done"] = epoch + 1
            if epoch + 1 < cfg.epochs:
                checkpoints.save({"params": params.state(), "optimizer": optimizer.state_dict(),
                                  "schedule": schedule.state_dict(), "stats": stats, "best": best})
    finally:
        bar.close()
    params.load(best)
    stats["kl_after"] = min([stats["kl_before"], *stats["kl_measured"]])
    return stats


def _step_grads(executor: Executor, params: TunedParams, windows: torch.Tensor, teacher: torch.Tensor,
                idx: torch.Tensor, owned: Ownership) -> float:
    """One step's KL, its gradients in the leaves: this rank's windows of the step, weighted by their share of it,
    summed over the ranks (one process: the whole step)."""
    mine = owned.local(idx) + owned.start  # windows are held whole here: back to the job's indices
    loss = 0.0
    if len(mine):
        loss = executor.kl_and_grads(windows[mine], teacher[mine])
        if len(mine) < len(idx):
            share = len(mine) / len(idx)
            loss *= share
            with torch.no_grad():
                for leaf in params.leaves():
                    if leaf.grad is not None:
                        leaf.grad.mul_(share)
    owned.sum_grads_(params.leaves())
    return owned.sum(loss)


def measure(executor: Executor, windows: torch.Tensor, teacher: torch.Tensor, batch_size: int) -> float:
    """The mean KL over the windows' batches, no update (under torchrun, each rank's batches, gathered in order)."""
    part = world().shard(windows.shape[0], batch_size)
    kls = [executor.kl(windows[start : start + batch_size], teacher[start : start + batch_size])
           for start in range(part.start, part.stop, batch_size)]
    kls = [kl for rank_kls in world().gather_objects(kls) for kl in rank_kls]
    return sum(kls) / len(kls)
