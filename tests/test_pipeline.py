"""End-to-end pipeline behaviour on a tiny random LLaMA: caching, invalidation, resume after kill -9."""
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, read_results, run_cli, tiny_overrides

RTN = "pipeline.stages=[calibrate,collect_activations,fuse,evaluate]"


def stage_rows(results):
    return {row["stage"]: row for row in results["stages"]}


def test_rerun_hits_cache_and_config_slices_invalidate(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "r1"), RTN])
    assert first.returncode == 0, first.stderr[-3000:]
    r1 = read_results(tmp_path / "r1")
    rows = stage_rows(r1)
    assert rows["calibrate"]["computed"] == 1 and rows["fuse"]["computed"] == 3
    assert rows["search_theta"]["status"] == "disabled"
    assert r1["ppl"]["wiki_sample"]["rtn"] != r1["ppl"]["wiki_sample"]["fp"]  # quantization changed the model

    again = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "r2"), RTN])
    assert again.returncode == 0, again.stderr[-3000:]
    r2 = read_results(tmp_path / "r2")
    for name in ("calibrate", "collect_activations", "fuse", "evaluate"):
        assert stage_rows(r2)[name]["computed"] == 0, name
        assert stage_rows(r2)[name]["cached"] > 0, name
    assert "cache hit" in again.stderr + again.stdout
    assert r2["ppl"] == r1["ppl"]

    # Activation bits: calibration and block 0's statistics are unaffected; everything after is recomputed.
    changed = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "r3"), RTN, "quant.abits=8"])
    assert changed.returncode == 0, changed.stderr[-3000:]
    rows = stage_rows(read_results(tmp_path / "r3"))
    assert rows["calibrate"]["cached"] == 1 and rows["calibrate"]["computed"] == 0
    assert rows["collect_activations"]["cached"] == 1 and rows["collect_activations"]["computed"] == 2
    assert rows["fuse"]["computed"] == 3
    assert rows["evaluate"]["cached"] == 1  # fp row reused, rtn recomputed
    assert rows["evaluate"]["computed"] == 1

    # Forcing a stage recomputes it although cached.
    forced = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "r4"), RTN, "pipeline.force=[fuse]"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    rows = stage_rows(read_results(tmp_path / "r4"))
    assert rows["collect_activations"]["computed"] == 0 and rows["fuse"]["computed"] == 3


def _count(path):
    return len([p for p in path.iterdir() if ".tmp-" not in p.name]) if path.exists() else 0


def test_killed_run_resumes_to_the_same_numbers(tiny_model_dir, tmp_path):
    args = ["train_lowrank.epochs=6"]
    reference = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "ref_cache", tmp_path / "ref"), *args])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qllm_pipeline", *tiny_overrides(tiny_model_dir, cache, tmp_path / "killed"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _count(cache / "fuse") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _count(cache / "fuse")
    assert 1 <= done < 3

    resumed = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "resumed"), *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = stage_rows(read_results(tmp_path / "resumed"))
    assert rows["fuse"]["cached"] == done and rows["fuse"]["computed"] == 3 - done
    assert not list(cache.glob("*/*.tmp-*")), "partial artifacts left behind"
    assert read_results(tmp_path / "resumed")["ppl"] == read_results(tmp_path / "ref")["ppl"]


def test_channel_ratio_reruns_search_theta_and_later_only(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "a"), "pipeline.plots=true"])
    assert first.returncode == 0, first.stderr[-3000:]
    rows = stage_rows(read_results(tmp_path / "a"))
    assert all(rows[s]["computed"] == 3 for s in ("search_theta", "reassemble", "train_lowrank", "fuse"))
    theta = (next((cache / "search_theta").iterdir()) / "theta.json").read_text()
    assert '"curve"' in theta
    plots = ("theta_curve.png", "channel_max.png", "lrc_loss.png", "perplexity.png")  # drawn from the artifacts
    for name in plots:
        assert (tmp_path / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    second = run_cli([*tiny_overrides(tiny_model_dir, cache, tmp_path / "b"), "search_theta.channel_ratio=0.05"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert not [name for name in plots if (tmp_path / "b" / name).exists()]  # pipeline.plots=false
    rows = stage_rows(read_results(tmp_path / "b"))
    assert rows["calibrate"]["cached"] == 1
    # Block 0 sees the same inputs, so its activation statistics are reused; later blocks' inputs changed.
    assert rows["collect_activations"]["cached"] == 1 and rows["collect_activations"]["computed"] == 2
    for stage in ("search_theta", "reassemble", "train_lowrank", "fuse"):
        assert rows[stage]["computed"] == 3, stage
    ppl = read_results(tmp_path / "b")["ppl"]["wiki_sample"]
    assert set(ppl) == {"fp", "rtn", "cra", "cra+lrc"}
    assert stage_rows(read_results(tmp_path / "b"))["evaluate"]["cached"] == 2  # fp and rtn rows reused
