"""Every config key has a decided effect on the cache: which stages' keys it changes (their downstream follows through
the key chain), or that it enters through content (model identity, text and window digests), or that it changes no
number. A key added later without a decision here fails this test."""
import copy

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from qllm_pipeline.stages import STAGES

# key (or group prefix ending in ".") -> the stages whose own key part it changes
DIRECT = {
    "calibrate.": {"calibrate"},
    "rotate.": {"rotate"},
    "pipeline.batch_size": {"collect_activations"},  # batched statistics: sums in another order
    "smooth.": {"smooth"},
    "search_theta.": {"search_theta"},
    "reassemble.assemble": {"search_theta", "reassemble"},
    "reassemble.enabled": {"reassemble"},
    "train_lowrank.": {"train_lowrank"},  # act_clip_* only while train_lowrank.learn_act_clip (the test sets it)
    "quant.": {"search_theta", "train_lowrank", "fuse"},
    "gptq.": {"train_lowrank", "fuse"},  # only while quant.weight_algorithm=gptq (the test sets it)
    "tune_e2e.": {"tune_e2e"},
}
# keys that enter keys through content, tested in tests/test_content_keys.py
CONTENT = {
    "model.": "the model identity (weight files' sha256 or hub commit, dtype) is upstream of every stage",
    "data.": "calibrate keys the calibration text's sha256; evaluate keys the evaluation windows' sha256",
    "eval.seq_len": "evaluate keys the evaluation windows' sha256",
    "eval.max_windows": "evaluate keys the evaluation windows' sha256",
    "eval.datasets": "evaluate keys the evaluation windows' sha256",
    "eval.tasks": "the zero-shot rows' keys carry the task list",
    "eval.limit": "the zero-shot rows' keys carry the limit",
    "pipeline.stages": "a stage left out is keyed as disabled",
    "pipeline.device": "the resolved device type is in every block and final stage's key",
}
# keys that change no number
NO_EFFECT = {
    "pipeline.force": "recomputes; the key stays",
    "pipeline.cache_dir": "where the cache is",
    "pipeline.plan_only": "prints the plan and stops",
    "pipeline.progress": "progress bars",
    "pipeline.plots": "whether the run's PNG plots are drawn (from the artifacts)",
    "pipeline.memory_check": "whether a plan that does not fit is refused",
    "pipeline.device_memory_gb": "the budget the plan is checked against",
    "pipeline.host_memory_gb": "the budget the plan is checked against; tune_e2e keeps or rebuilds its blocks and "
                               "spills its inputs by it (the same numbers: tests/test_tune_e2e.py)",
    "pipeline.ranks": "the ranks the plan is for; a torchrun job's artifacts are one process's (tests/test_distributed.py)",
    "tune_e2e.mode": "one block on the device at a time or all at once: the same gradients (tests/test_tune_e2e.py)",
    "eval.batch_size": "windows per forward pass at evaluation",
    "fuse.save_model": "whether the whole model is also written",
    "fuse.format": "the written model's layout (the model artifact's own key carries it)",
    "fuse.export_dtype": "the written model's floating-point tensors (the model artifact's own key carries it)",
    "logger.": "where metrics go",
    "quant.name": "a label",
    # keys carry the *resolved* clip ratio: the A6 entry of the recipes' {4: .., 6: ..} map changes nothing in these
    # A4 configs (at A6 it moves the quant stages like any quant.* key)
    "quant.a_clip_ratio.6": "the clip ratio of another activation bit width",
    # likewise tune_e2e keys the scale rate of the run's weight width (4 here): other entries of its map change nothing
    "tune_e2e.scale_lr.6": "the scale rate of another weight bit width",
    "tune_e2e.scale_lr.8": "the scale rate of another weight bit width",
    "tune_e2e.batch_size.6": "the batch size of another weight bit width",
}


def decision(key: str):
    for table in (NO_EFFECT, CONTENT, DIRECT):  # the most specific tables first
        for entry, value in table.items():
            if key == entry or (entry.endswith(".") and key.startswith(entry)):
                return table, value
    return None, None


def leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# Keys whose value must name a registered choice (the key is computed for valid settings only): the other choice.
CHOICES = {"quant.weight_algorithm": ("rtn", "gptq")}


def changed(value, key: str = ""):
    if key in CHOICES:
        return next(c for c in CHOICES[key] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.1
    if isinstance(value, list):
        return value[:-1] if value else ["x"]
    if value is None:
        return 7
    return f"{value}_other"


@pytest.fixture(scope="module")
def configs():
    out = {}
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        for extra in ([], ["data=text_files", "data.calib_path=c", "data.eval_path=e", "logger=wandb"],
                      ["method=rotation_qllm_gptq", "smooth.alpha=0.5"]):
            cfg = compose("config", overrides=["pipeline.cache_dir=/tmp/c", "quant.weight_algorithm=gptq",
                                               "train_lowrank.learn_act_clip=true", *extra])
            out[tuple(extra)] = OmegaConf.to_container(cfg, resolve=False)
    return out


def stage_parts(container):
    """What the runner keys each stage on: whether it is enabled (a disabled stage is keyed as such) and its part."""
    resolved = OmegaConf.to_container(OmegaConf.create(container), resolve=True)
    return {name: (stage.enabled(resolved), stage.key_config(resolved)) for name, stage in STAGES.items() if name != "calibrate"}


def test_every_config_key_has_a_decided_cache_effect(configs):
    undecided = sorted({k for c in configs.values() for k, _ in leaves(c) if k != "hydra" and decision(k)[0] is None})
    assert undecided == [], f"decide each key's effect on the cache in tests/test_key_table.py: {undecided}"


def test_each_key_changes_exactly_its_stages(configs):
    # calibrate's part hashes the calibration text (loaded): checked for its own keys below, not per leaf here
    for container in configs.values():
        base = stage_parts(container)
        for key, value in leaves(container):
            table, expected = decision(key)
            if table is not DIRECT or key.startswith("calibrate."):
                continue
            perturbed = copy.deepcopy(container)
            OmegaConf.update(cfg := OmegaConf.create(perturbed), key, changed(value, key), force_add=True)
            after = stage_parts(OmegaConf.to_container(cfg, resolve=False))
            moved = {name for name in base if base[name] != after[name]}
            assert moved == expected, f"{key}: changes {sorted(moved)}, the table says {sorted(expected)}"


def test_no_effect_keys_change_no_stage_key(configs):
    for container in configs.values():
        base = stage_parts(container)
        for key, value in leaves(container):
            if decision(key)[0] is not NO_EFFECT or key.startswith("pipeline.cache_dir"):
                continue
            cfg = OmegaConf.create(copy.deepcopy(container))
            OmegaConf.update(cfg, key, changed(value, key), force_add=True)
            assert stage_parts(OmegaConf.to_container(cfg, resolve=False)) == base, key


def test_calibrate_key_follows_its_settings_and_the_text_only(configs):
    container = configs[()]
    calibrate = STAGES["calibrate"]
    base = calibrate.key_config(OmegaConf.to_container(OmegaConf.create(container), resolve=True))
    for key in ("calibrate.n_samples", "calibrate.seq_len", "calibrate.seed"):
        cfg = OmegaConf.create(copy.deepcopy(container))
        OmegaConf.update(cfg, key, OmegaConf.select(cfg, key) + 1)
        assert calibrate.key_config(OmegaConf.to_container(cfg, resolve=True)) != base, key
    for key, value in (("eval.seq_len", 64), ("model.name", "renamed"), ("quant.wbits", 8)):
        cfg = OmegaConf.create(copy.deepcopy(container))
        OmegaConf.update(cfg, key, value)
        assert calibrate.key_config(OmegaConf.to_container(cfg, resolve=True)) == base, key
