"""End-to-end tuning of a fused quantized model's quantization parameters (EfficientQAT's E2E-QP, with a
distillation loss): the integer weight codes stay fixed, and what is trained is each weight row's (group's) scale,
each projection's activation clip ratio and optionally the RMSNorm weights, so that the quantized model's
next-token distribution matches the full-precision model's (KL divergence, per token) on the calibration windows.

Block-wise training (LRC) matches each block's output; the errors it leaves compound through the model. Tuning
the few parameters that set the quantization grids against the model's final output undoes part of that, and
cannot overfit much: per projection a scale per row and one clip ratio. The result is an ordinary fused model
(new scales, clip ratios and norms; the same codes), so every export and runtime takes it unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import decoder_layers, get_submodule, quant_linears
from .fused import NORM_NAMES
from .lowrank import ACT_CLIP_MIN

TUNED_FIELDS = ("scale", "act_clip")  # per projection, plus the norm weights: what `tuned_tensors` returns


@dataclass
class E2EConfig:
    epochs: int = 2
    batch_size: int = 1
    scale_lr: float = 4e-3  # AdamW moves each scale by about this fraction per step
    act_clip_lr: float = 5e-3
    norm_lr: float = 0.0  # 0: the norm weights stay as they are
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"tune_e2e.{name}={value!r} must be an integer")
        if self.epochs < 1:
            raise ValueError(f"tune_e2e.epochs={self.epochs} must be >= 1 (or leave the tune_e2e stage out)")
        if self.batch_size < 1:
            raise ValueError(f"tune_e2e.batch_size={self.batch_size} must be a positive integer")
        for name in ("scale_lr", "act_clip_lr", "norm_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"tune_e2e.{name}={value!r} must be a number >= 0 (0: not tuned)")
        if not (self.scale_lr or self.act_clip_lr or self.norm_lr):
            raise ValueError("tune_e2e: scale_lr, act_clip_lr and norm_lr are all 0, so nothing would be tuned; "
                             "set one of them or leave the tune_e2e stage out")


@contextmanager
def swapped_layers(model: nn.Module, layers: list[nn.Module]) -> Iterator[nn.Module]:
    """`model` with its decoder layers replaced by `layers` for the duration (the original list is restored)."""
    original = model.model.layers
    model.model.layers = nn.ModuleList(layers)
    try:
        yield model
    finally:
        model.model.layers = original


def attach_tuning(layers: list[nn.Module], cfg: E2EConfig) -> list[dict]:
    """Make the parameters `cfg` tunes trainable on fused blocks; returns AdamW parameter groups (empty ones left out).
    At this point the blocks compute exactly what they did (scale deltas 0, clip ratios at their values)."""
    scales, clips, norms = [], [], []
    for block in layers:
        for ql in quant_linears(block).values():
            if cfg.scale_lr and ql.weight_spec.enabled:
                ql.add_scale_tuning()
                scales.append(ql.scale_delta)
            if cfg.act_clip_lr and ql.act_spec.enabled:
                ql.add_act_clip()
                clips.append(ql.act_clip)
        if cfg.norm_lr:
            norms += [get_submodule(block, name).weight for name in NORM_NAMES]
    groups = [{"params": scales, "lr": cfg.scale_lr}, {"params": clips, "lr": cfg.act_clip_lr},
              {"params": norms, "lr": cfg.norm_lr}]
    groups = [g for g in groups if g["params"]]
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def commit_tuning(layers: list[nn.Module]) -> None:
    """Fold the tuned values into the fused blocks (new scales and clip ratios; nothing trainable left)."""
    for block in layers:
        for ql in quant_linears(block).values():
            ql.commit_scale_tuning()
            if ql.act_clip is not None:
                ql.set_act_clip(float(ql.act_clip.detach()))
        block.requires_grad_(False)


def tuned_tensors(layers: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Per block, what tuning may have changed in its fused tensors: `<name>.scale`, `<name>.act_clip`, the norms."""
    out = []
    for block in layers:
        tensors = {}
        for name, ql in quant_linears(block).items():
            if ql.codes is not None:
                tensors[f"{name}.scale"] = ql.codes["scale"].detach().cpu().contiguous()
            if ql.act_clip_learned:
                tensors[f"{name}.act_clip"] = torch.tensor(ql.act_spec.clip_ratio, dtype=torch.float32)
        for norm in NORM_NAMES:
            tensors[f"{norm}.weight"] = get_submodule(block, norm).weight.detach().cpu().contiguous()
        out.append(tensors)
    return out


def _kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def tune_model(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, cfg: E2EConfig, device,
               progress: bool = True) -> dict:
    """Tune `model` (fused quantized blocks in its decoder layers) toward `teacher` on `windows` [n, seq] in place;
    AdamW with a linear decay to 0, clip ratios kept in [ACT_CLIP_MIN, 1]. Returns the KL before and after (means
    over the windows, no update), the mean KL of each epoch's steps, and the number of steps. Everything is moved
    back to the CPU."""
    layers = list(decoder_layers(model))
    groups = attach_tuning(layers, cfg)
    model.to(device)
    teacher.to(device)
    _codes_to(layers, device)
    clips = [p for g in groups for p in g["params"] if p.dim() == 0]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    batches = math.ceil(windows.shape[0] / cfg.batch_size)
    steps = cfg.epochs * batches
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    bar = tqdm(total=steps, desc="tune_e2e", disable=not progress)
    try:
        before = _mean_kl(model, teacher, windows, cfg.batch_size, device)
        for _ in range(cfg.epochs):
            order = torch.randperm(windows.shape[0], generator=generator)
            losses = []
            for idx in order.split(cfg.batch_size):
                batch = windows[idx].to(device)
                with torch.no_grad():
                    target = teacher(batch).logits
                loss = _kl_to_teacher(model(batch).logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for clip in clips:
                        clip.clamp_(ACT_CLIP_MIN, 1.0)
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix_str(f"kl {losses[-1]:.4f}")
            history.append(sum(losses) / len(losses))
        # The epoch means are taken while the parameters move; the KL of the result is measured the same way as before.
        after = _mean_kl(model, teacher, windows, cfg.batch_size, device)
    finally:
        bar.close()
        commit_tuning(layers)
        model.to("cpu")
        teacher.to("cpu")
        _codes_to(layers, "cpu")
    return {"kl_before": before, "kl_after": after, "kl_per_epoch": history, "steps": steps}


def _mean_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int, device) -> float:
    with torch.no_grad():
        kls = [float(_kl_to_teacher(model(w.to(device)).logits, teacher(w.to(device)).logits))
               for w in windows.split(batch_size)]
    return sum(kls) / len(kls)


def _codes_to(layers: list[nn.Module], device) -> None:
    for block in layers:
        for ql in quant_linears(block).values():
            if ql.codes is not None:
                ql.codes = {k: v.to(device) for k, v in ql.codes.items()}
