"""Low-rank error correction (LRC, QLLM §3.3): per decoder block, a LoRA-style correction trained to undo quantization error.

Every QuantLinear of a block gets A (r×in, Kaiming-uniform) and B (out×r, zeros), so at initialisation the block
computes exactly what it did before. With the base weights frozen, A and B (and optionally the two RMSNorm weights)
are trained with AdamW and a linear learning-rate decay so that the quantized block's output matches the
full-precision block's output (MSE). The quantizer sees W + B·A (straight-through estimator), so merging the
correction into the weight afterwards, W' = Q(W + B·A), reproduces the trained block exactly (`fuse_block`).

Inputs and targets stay wherever the caller keeps them (CPU for large models) and are moved to the device one
mini-batch at a time; only the block, its trainable parameters, the optimizer state and one batch's activations
need to be on the device at once (see `qllm_pipeline.core.lrc_memory`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qllm_pipeline.core.distributed import Ownership, world
from qllm_pipeline.core.settings import check_settings, setting
from qllm_pipeline.model.arch import block_family
from qllm_pipeline.quantized.blocks import get_submodule, quant_linears

AUTOCAST_CHOICES = ("auto", "none", "bf16", "fp16")
ACT_CLIP_MIN = 0.5  # a learned activation clip ratio stays in [0.5, 1]
_NORMS_TRAINED_ATTR = "_lrc_norms_trained"


@dataclass
class LowRankConfig:
    """The settings of `train_lowrank` (conf group train_lowrank): its schema and the training's own config.

    The reference trains 10 epochs × 128 samples (1280 AdamW steps per block) at lr 5e-4; the CPU default trains 2
    epochs × 16 samples (32 steps), so it takes a 4× larger lr (measured on SmolLM2 block 3: MSE -12 % at 5e-4, -24 %
    at 2e-3). The default job (conf/method/qllm.yaml) trains 6 epochs, the held-out rule's choice; the recipes that
    refine GPTQ weights keep 2. Paper setting: train_lowrank.lr=5e-4 train_lowrank.epochs=10 calibrate.n_samples=128."""

    rank: int = setting(4, lo=1)
    lr: float = setting(2e-3, lo=0, lo_open=True, hint="a finite number > 0")
    epochs: int = setting(2, lo=1)
    batch_size: int = setting(1, lo=1)
    weight_decay: float = setting(0.0, lo=0, hint="a finite number >= 0")
    train_norms: bool = True
    # auto: bf16 autocast on CUDA if supported, none on CPU
    autocast: str = setting("auto", choices=AUTOCAST_CHOICES)
    seed: int = 0
    # also learn each projection's activation clip ratio (starting at quant.a_clip_ratio)
    learn_act_clip: bool = False
    # their learning rate (null: lr); AdamW moves each ratio by about this much per step
    act_clip_lr: float | None = setting(None, lo=0, lo_open=True, hint="a finite number > 0, or null (the same as lr)")
    # one ratio per input point (q/k/v share one, gate/up one: a fused QKV kernel quantizes its input once), or false:
    # one per projection
    act_clip_shared: bool = True

    def __post_init__(self):
        check_settings(self, "train_lowrank")


# ---------------------------------------------------------------------------------------------------------------
# Attaching, listing, saving and loading the correction


def _require_quant_linears(block: nn.Module) -> dict:
    qlinears = quant_linears(block)
    if not qlinears:
        raise ValueError("the block has no QuantLinear projections; call quantize_block_linears (or make_quant_block) first")
    return qlinears


def attach_lora(block: nn.Module, rank: int, seed: int) -> None:
    """Attach a fresh rank-`rank` correction (B = 0) to every QuantLinear of `block`, in forward order.

    A is drawn from one CPU generator seeded with `seed`, so the result does not depend on the device.
    An existing correction is replaced.
    """
    generator = torch.Generator().manual_seed(int(seed))
    for ql in _require_quant_linears(block).values():
        ql.add_lora(int(rank), generator)
        ql.lora_A.requires_grad_(False)
        ql.lora_B.requires_grad_(False)


def attach_act_clips(block: nn.Module, shared: bool = True) -> None:
    """A trainable activation clip ratio per projection, or (`shared`) per input point: the projections that read
    the same input (q/k/v; gate/up) share one parameter, so a deployment can quantize that input once (a fused QKV
    kernel). Per projection, q, k and v each quantize the shared input with their own ratio (our runtimes do)."""
    qlinears = _require_quant_linears(block)
    input_groups = block_family(block).input_groups
    groups = input_groups if shared else tuple((name,) for group in input_groups for name in group)
    for group in groups:
        members = [qlinears[name] for name in group if name in qlinears]
        if not members or not members[0].act_spec.enabled or members[0].act_clip is not None:
            continue
        members[0].add_act_clip()
        for ql in members[1:]:
            ql.act_clip = members[0].act_clip


def _norm_modules(block: nn.Module) -> dict[str, nn.Module]:
    return {name: get_submodule(block, name) for name in block_family(block).norms}


def trainable_parameters(block: nn.Module, train_norms: bool) -> list[nn.Parameter]:
    """A and B of every QuantLinear (forward order, A before B), then the norm weights if `train_norms`.

    Does not change `requires_grad`; `train_block` does that for the duration of training.
    """
    params: list[nn.Parameter] = []
    qlinears = _require_quant_linears(block)
    for name, ql in qlinears.items():
        if ql.lora_A is None or ql.lora_B is None:
            raise ValueError(f"{name} has no low-rank correction attached; call attach_lora first")
        params += [ql.lora_A, ql.lora_B]
    shared = {id(ql.act_clip): ql.act_clip for ql in qlinears.values() if ql.act_clip is not None}
    params += list(shared.values())  # once each: q/k/v (gate/up) share one
    if train_norms:
        params += [norm.weight for norm in _norm_modules(block).values()]
    return params


def lora_state(block: nn.Module, include_norms: bool | None = None) -> dict[str, torch.Tensor]:
    """The trained correction as CPU contiguous tensors: `<linear>.lora_A`, `<linear>.lora_B` and, when the norms were
    trained (or `include_norms=True`), `<norm>.weight`. Tensors keep the block's dtype."""
    state: dict[str, torch.Tensor] = {}
    for name, ql in _require_quant_linears(block).items():
        if ql.lora_A is None or ql.lora_B is None:
            raise ValueError(f"{name} has no low-rank correction attached; nothing to save")
        state[f"{name}.lora_A"] = ql.lora_A.detach().to("cpu", copy=True).contiguous()
        state[f"{name}.lora_B"] = ql.lora_B.detach().to("cpu", copy=True).contiguous()
        if ql.act_clip is not None:
            state[f"{name}.act_clip"] = ql.act_clip.detach().to("cpu", torch.float32, copy=True)
    if include_norms is None:
        include_norms = bool(getattr(block, _NORMS_TRAINED_ATTR, False))
    if include_norms:
        for name, norm in _norm_modules(block).items():
            state[f"{name}.weight"] = norm.weight.detach().to("cpu", copy=True).contiguous()
    return state


def load_lora_state(block: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `lora_state`: attach a correction of the stored rank where needed and copy the tensors in.

    Every QuantLinear of the block must have both its A and B in `state`; norm weights are optional. Values are
    copied into the block's parameters (their dtype and device), which is exact when the dtypes match.
    """
    qlinears = _require_quant_linears(block)
    norms = _norm_modules(block)
    known = {f"{n}.lora_{p}" for n in qlinears for p in "AB"} | {f"{n}.act_clip" for n in qlinears} | {f"{n}.weight" for n in norms}
    unknown = sorted(set(state) - known)
    if unknown:
        raise ValueError(f"unexpected keys in the low-rank state: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    with torch.no_grad():
        for name, ql in qlinears.items():
            key_a, key_b = f"{name}.lora_A", f"{name}.lora_B"
            if key_a not in state or key_b not in state:
                raise ValueError(f"the low-rank state has no {key_a} / {key_b}; it was saved for a different block layout")
            a, b = state[key_a], state[key_b]
            rank = a.shape[0]
            expected_a = (rank, ql.effective_in_features)
            expected_b = (ql.out_features, rank)
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise ValueError(
                    f"{name}: stored A {tuple(a.shape)} / B {tuple(b.shape)} do not fit this layer "
                    f"(expected {expected_a} / {expected_b}); was the block reassembled the same way?"
                )
            if ql.lora_A is None or ql.lora_A.shape != a.shape:
                ql.add_lora(rank)
            ql.lora_A.copy_(a)
            ql.lora_B.copy_(b)
            ql.lora_A.requires_grad_(False)
            ql.lora_B.requires_grad_(False)
            if f"{name}.act_clip" in state:
                ql.add_act_clip()
                ql.act_clip.copy_(state[f"{name}.act_clip"])
            ql.weight_changed()
        loaded_norms = False
        for name, norm in norms.items():
            key = f"{name}.weight"
            if key in state:
                if tuple(state[key].shape) != tuple(norm.weight.shape):
                    raise ValueError(f"{key}: stored shape {tuple(state[key].shape)} != {tuple(norm.weight.shape)}")
                norm.weight.copy_(state[key])
                loaded_norms = True
    if loaded_norms:
        setattr(block, _NORMS_TRAINED_ATTR, True)


def fuse_block(block: nn.Module) -> None:
    """Merge and quantize: every QuantLinear's weight becomes Q(W + B·A) and its LoRA parameters are dropped."""
    for ql in _require_quant_linears(block).values():
        ql.fuse()


# ---------------------------------------------------------------------------------------------------------------
# Training


def resolve_autocast(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` on `device` (None: no autocast)."""
    if mode not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast={mode!r} is not one of {AUTOCAST_CHOICES}")
    if mode == "none":
        return None
    if mode == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _batch(tensor: torch.Tensor, index, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor[index].to(device=device, dtype=dtype, non_blocking=True)


def _output_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_mse(block, run_block, inputs, targets, device, batch_size: int, compute_dtype: torch.dtype | None = None) -> float:
    """Mean squared error of `run_block(block, x)` against `targets` over all samples (no grad, no autocast)."""
    device = torch.device(device)
    total = 0.0
    count = 0
    for start in range(0, inputs.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        out = _output_tensor(run_block(block, _batch(inputs, sl, device, compute_dtype)))
        y = _batch(targets, sl, device, None)
        total += (out.float() - y.float()).pow(2).sum(dtype=torch.float64).item()
        count += out.numel()
    if world().active:  # a data-parallel job's ranks each hold some of the samples
        summed = world().all_reduce_(torch.tensor([total, float(count)], dtype=torch.float64))
        total, count = float(summed[0]), int(summed[1])
    return total / max(count, 1)


def train_block(
    block: nn.Module,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    cfg: LowRankConfig,
    device,
    progress: bool = True,
    desc: str = "lrc",
) -> dict:
    """Train the low-rank correction (and optionally the norms) of `block`, already on `device`, in place.

    inputs / targets: [N, L, H] (any float dtype, typically on CPU): the quantized block's inputs and the
    full-precision block's outputs. A correction is attached (seeded with cfg.seed) where none is.
    Trainable parameters are kept in fp32 while training (master copies) and cast back to their dtype at the end.
    Loss: MSE between the block output and the target, computed in fp32. Optimiser: AdamW over all trainable
    parameters; learning rate decays linearly from cfg.lr to 0 over all steps (no warm-up). Samples are shuffled each
    epoch with a torch.Generator seeded with cfg.seed; the last batch of an epoch may be smaller.
    Returns loss_before / loss_after (MSE over all samples, eval mode, no grad, no autocast: the block as it will be
    used) and epoch_losses (mean training loss of each epoch, as seen by the optimiser, under autocast).

    Under torchrun each rank passes the samples it holds; the steps are the job's (one shuffle of all samples), each
    rank computes its share of a step's loss and the gradients are summed (`distributed.Ownership`): the same updates
    as one process.
    """
    device = torch.device(device)
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same shape")
    owned = Ownership(world(), inputs.shape[0])
    n = owned.total
    if n == 0:
        raise ValueError("train_block needs at least one sample")
    qlinears = _require_quant_linears(block)
    if any(ql.lora_A is None for ql in qlinears.values()):
        attach_lora(block, cfg.rank, cfg.seed)
    if cfg.learn_act_clip:
        attach_act_clips(block, cfg.act_clip_shared)
    compute_dtype = next(iter(qlinears.values())).weight.dtype
    amp_dtype = resolve_autocast(cfg.autocast, device)
    batch_size = min(int(cfg.batch_size), n)
    was_training = block.training

    block.requires_grad_(False)
    block.eval()
    loss_before = block_mse(block, run_block, inputs, targets, device, batch_size, compute_dtype)

    params = trainable_parameters(block, cfg.train_norms)
    orig_dtypes = [p.dtype for p in params]
    epoch_losses: list[float] = []
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * int(cfg.epochs)
    try:
        for p in params:  # fp32 master copies (the frozen base weights keep their dtype)
            if p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
        if total_steps > 0:
            clips = {id(ql.act_clip) for ql in qlinears.values() if ql.act_clip is not None}
            groups = [{"params": [p for p in params if id(p) not in clips]}]
            if clips:  # no weight decay on a ratio; its own learning rate
                groups.append({"params": [p for p in params if id(p) in clips], "weight_decay": 0.0,
                               "lr": float(cfg.act_clip_lr if cfg.act_clip_lr is not None else cfg.lr)})
            optimizer = torch.optim.AdamW(groups, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=total_steps)
            scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
            generator = torch.Generator().manual_seed(int(cfg.seed))
            block.train()
            bar = tqdm(range(int(cfg.epochs)), desc=desc, leave=False, disable=not progress)
            for _epoch in bar:
                order = torch.randperm(n, generator=generator)
                loss_sum = 0.0
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    mine = owned.local(idx)
                    optimizer.zero_grad(set_to_none=True)
                    value = 0.0
                    if len(mine):
                        x = _batch(inputs, mine, device, compute_dtype)
                        y = _batch(targets, mine, device, None)
                        with _autocast_ctx(device, amp_dtype):
                            out = _output_tensor(run_block(block, x))
                        loss = nn.functional.mse_loss(out.float(), y.float())
                        if len(mine) < len(idx):  # this rank's share of the step's mean
                            loss = loss * (len(mine) / len(idx))
                        value = loss.item()
                        scaler.scale(loss).backward()
                    value = owned.sum(value)
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"{desc}: low-rank training loss became {value}; lower train_lowrank.lr or use autocast=none"
                        )
                    owned.sum_grads_(params)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    with torch.no_grad():  # a ratio: clip at most half of each token's range, never widen it
                        for ql in qlinears.values():
                            if ql.act_clip is not None:
                                ql.act_clip.clamp_(ACT_CLIP_MIN, 1.0)
                    loss_sum += value * len(idx)
                epoch_losses.append(loss_sum / n)
                bar.set_postfix(loss=f"{epoch_losses[-1]:.4g}")
            bar.close()
            del optimizer, scheduler
    finally:
        block.requires_grad_(False)
        for p, dtype in zip(params, orig_dtypes):
            p.grad = None
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        block.train(was_training)
    setattr(block, _NORMS_TRAINED_ATTR, bool(cfg.train_norms) or bool(getattr(block, _NORMS_TRAINED_ATTR, False)))

    block.eval()
    loss_after = block_mse(block, run_block, inputs, targets, device, batch_size, compute_dtype)
    block.train(was_training)
    return {"loss_before": loss_before, "loss_after": loss_after, "epoch_losses": epoch_losses}
