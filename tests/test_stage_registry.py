"""The stage contract: one registry from which the order derives, every method × quant preset composes and
validates, held-out calibration windows never overlap the calibration windows."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qllm_pipeline.core.runner import validate_config
from qllm_pipeline.core.stage import BLOCK, FINAL, ONCE, BlockStage, FinalStage, OnceStage, StageSpec, registry
from qllm_pipeline.data.windows import calibration_starts, calibration_windows, heldout_windows
from qllm_pipeline.methods.theta_search import reference_steps, theta_grid
from qllm_pipeline.stages import STAGES

CONF = Path(__file__).resolve().parent.parent / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
QUANTS = sorted(p.stem for p in (CONF / "quant").glob("*.yaml"))


def test_pipeline_order_is_derived_from_the_registry():
    assert list(STAGES) == [
        "calibrate", "rotate", "collect_activations", "smooth", "search_theta", "reassemble", "train_lowrank", "fuse", "tune_e2e",
        "evaluate",
    ]
    kinds = [s.spec.kind for s in STAGES.values()]
    assert kinds == [ONCE] * 2 + [BLOCK] * 6 + [FINAL] * 2
    assert [n for n, s in STAGES.items() if s.spec.needs_fp_targets] == ["train_lowrank"]


def test_registry_refuses_a_final_stage_before_a_block_stage_and_duplicates():
    class Late(FinalStage):
        spec = StageSpec("late", 1, (), kind=FINAL)

    class Block(BlockStage):
        spec = StageSpec("block", 1, ())

    class First(OnceStage):
        spec = StageSpec("first", 1, (), kind=ONCE)

    assert list(registry([First(), Block(), Late()])) == ["first", "block", "late"]
    with pytest.raises(ValueError, match="once-stages first"):
        registry([First(), Late(), Block()])
    with pytest.raises(ValueError, match="duplicate"):
        registry([First(), Block(), Block()])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("quant", QUANTS)
def test_every_method_and_quant_preset_composes_and_validates(method, quant):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"method={method}", f"quant={quant}", "pipeline.cache_dir=/tmp/unused"])
    c = OmegaConf.to_container(cfg, resolve=True)
    validate_config(c, STAGES)  # raises PipelineError on any bad setting
    assert c["pipeline"]["stages"][0] == "calibrate" and "fuse" in c["pipeline"]["stages"]


def test_heldout_windows_never_overlap_the_calibration_windows():
    tokens = torch.arange(20_000)
    starts = calibration_starts(tokens.numel(), 16, 512, seed=0)
    calib = calibration_windows(tokens, 16, 512, seed=0)
    assert [int(w[0]) for w in calib] == starts
    held = heldout_windows(tokens, starts, 512, 256, max_windows=8)
    assert held.shape == (8, 256)
    used = set(torch.cat(list(calib)).tolist())
    assert not used & set(held.flatten().tolist())
    # deterministic, on the grid of 256-token windows, spread over the text (no documents: evenly)
    assert torch.equal(held, heldout_windows(tokens, starts, 512, 256, max_windows=8))
    assert all(int(w[0]) % 256 == 0 for w in held)
    assert int(held.min()) < 20_000 // 8 and int(held.max()) > 20_000 * 7 // 8


def test_reference_theta_grid_when_steps_is_null():
    m = torch.tensor([2500.0, 3.0, 1.0, 0.5])
    assert reference_steps(m) == 5000
    grid = theta_grid(m, None, channel_ratio=0.5)
    assert grid[0] == 2500.0 and len(grid) <= 5000
    assert abs((grid[0] - grid[1]) - (2500.0 - 0.5) / 5000) < 1e-9
