"""Data parallelism under torchrun: 2 CPU processes (gloo) give the one-process numbers for every method, a killed
rank ends the job and the same command resumes from the cache, and which rank owns which windows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, read_results, run_cli, tiny_overrides
from qllm_pipeline.core.distributed import Ownership, World

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
# Two batches of windows per rank, training steps of two windows (one per rank), the θ search's windows spread over
# both ranks, and evaluation batches on both: every reduction crosses the ranks.
DP_SETTINGS = ["calibrate.n_samples=8", "pipeline.batch_size=2", "train_lowrank.batch_size=2", "tune_e2e.batch_size=2",
               "search_theta.n_samples=6", "eval.batch_size=2"]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def ppl_rows(run_dir) -> dict:
    results = read_results(run_dir)
    return {(d, v): (p, results["window_nll"][d][v]) for d, row in results["ppl"].items() for v, p in row.items()}


def test_shards_are_whole_batches_in_order():
    for n, batch, size in [(8, 2, 2), (16, 4, 3), (5, 2, 2), (7, 1, 4)]:
        parts = World(0, size).shards(n, batch)
        assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
        assert all(p.start % batch == 0 for p in parts)
        counts = [-(-(p.stop - p.start) // batch) for p in parts]
        assert max(counts) - min(counts) <= 1


def test_ownership_maps_a_steps_windows_to_this_ranks_rows():
    owned = Ownership.of(World(1, 2), slice(4, 8), 8)
    assert owned.local(torch.tensor([6, 1, 4, 7])).tolist() == [2, 0, 3]
    assert Ownership.of(World(), slice(0, 8), 8).local(torch.tensor([3, 1])).tolist() == [3, 1]


@pytest.mark.long
def test_two_processes_give_the_one_process_numbers_for_every_method(tiny_model_dir, tmp_path):
    """Every conf/method on the tiny model: `torchrun --nproc_per_node=2` (gloo, 2 real processes) against one
    process, perplexity and every window's NLL to 1e-5 relative; rank 0 alone writes the run's results."""
    single = {}
    for method in METHODS:
        run_dir = tmp_path / "one" / method
        proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache_one", run_dir), *DP_SETTINGS, f"method={method}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        single[method] = ppl_rows(run_dir)

    overrides = [a for a in tiny_overrides(tiny_model_dir, tmp_path / "cache_two", tmp_path / "unused") if not a.startswith("hydra.")]
    proc = subprocess.run(torchrun(str(REPO / "tests" / "dp_worker.py"), str(tmp_path / "two"), *METHODS, "--",
                                   *overrides, *DP_SETTINGS),
                          cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for method in METHODS:
        two = ppl_rows(tmp_path / "two" / method)
        assert two.keys() == single[method].keys(), method
        for row, (ppl, windows) in single[method].items():
            assert two[row][0] == pytest.approx(ppl, rel=1e-5), (method, row)
            assert two[row][1] == pytest.approx(windows, rel=1e-5), (method, row)
        assert read_results(tmp_path / "two" / method)["meta"]["ranks"] == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == METHODS  # no second rank's run directory


@pytest.mark.long
def test_killed_rank_ends_the_job_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    """SIGKILL one of the two ranks after the first block: torchrun ends the job (the other rank does not hang);
    the same command resumes from the cache and reaches the one-process numbers. (One window per training step, so
    each step runs on one rank: the numbers are the same bits however many steps; see the README on split steps.)"""
    args = [*DP_SETTINGS, "method=qllm", "train_lowrank.epochs=12", "train_lowrank.batch_size=1"]
    reference = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "ref_cache", tmp_path / "ref"), *args])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cache = tmp_path / "cache"
    cmd = torchrun("-m", "qllm_pipeline", *tiny_overrides(tiny_model_dir, cache, tmp_path / "run"), *args)
    scratch = tmp_path / "tmp"  # the ranks' temporary directory: where rank 1 keeps its Hydra output
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fused = lambda: [p for p in (cache / "fuse").iterdir() if ".tmp-" not in p.name] if (cache / "fuse").exists() else []  # noqa: E731
    deadline = time.time() + 300
    while not fused() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the job finished before a rank could be killed; make it slower"
    # the ranks are torchrun's own children running the pipeline (not any process they start)
    ranks = [p for p in psutil.Process(job.pid).children() if "qllm_pipeline" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.kill(ranks[-1].pid, signal.SIGKILL)
    assert job.wait(timeout=120) != 0
    done = len(fused())
    assert 1 <= done < 3
    # SIGKILL runs no exit handler: the killed rank's folder stays until the next rank starts
    assert [p.name.split("-")[2] for p in scratch.glob("qllm-rank1-*")] == [str(ranks[-1].pid)]

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = read_results(tmp_path / "run")
    stages = {row["stage"]: row for row in results["stages"]}
    assert stages["fuse"]["cached"] == done and stages["fuse"]["computed"] == 3 - done
    assert not list(cache.glob("*/*.tmp-*")), "partial artifacts left behind"
    assert not list(scratch.glob("qllm-rank*")), "a rank's scratch folder left behind"
    for row, (ppl, _) in ppl_rows(tmp_path / "ref").items():
        assert ppl_rows(tmp_path / "run")[row][0] == pytest.approx(ppl, rel=1e-5)


def test_more_ranks_than_batches_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), "method=rtn"])
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: 3 ranks but calibrate.n_samples=4 with pipeline.batch_size=4 makes 1 batch(es) of windows; each rank "
        "needs one: start fewer ranks, or raise calibrate.n_samples or lower the batch size"]
    assert not (tmp_path / "cache" / "calibrate").exists()


@pytest.mark.long
def test_submitit_local_sweep_of_data_parallel_jobs_on_one_cache(tiny_model_dir, tmp_path):
    """Hydra's submitit launcher (the SLURM one's local twin, conf/hydra/launcher/local.yaml): 2 sweep jobs at once,
    each a 2-task job whose tasks are its ranks, on one cache: the shared artifacts are computed once, every job
    matches its one-process numbers, and the sweep summary is written."""
    args = [a for a in tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "unused") if not a.startswith("hydra.")]
    args += ["pipeline.batch_size=2"]
    proc = run_cli(["-m", *args, f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=local",
                    "hydra.launcher.tasks_per_node=2", "train_lowrank.rank=2,4"], in_process=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep" in proc.stdout + proc.stderr
    jobs = [read_results(tmp_path / "sweep" / str(i)) for i in (0, 1)]
    assert [job["meta"]["ranks"] for job in jobs] == [2, 2]
    computed = {}
    for job in jobs:
        for s in job["stages"]:
            computed[s["stage"]] = computed.get(s["stage"], 0) + s["computed"]
    assert computed["calibrate"] == 1
    assert computed["collect_activations"] == 1 + 2 * 2  # block 0 shared; blocks 1-2 follow each job's own LRC rank
    assert computed["evaluate"] == 2 + 2 * 2  # fp and rtn once
    assert (tmp_path / "sweep" / "sweep_summary.md").is_file()
    one = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache_one", tmp_path / "one"), "pipeline.batch_size=2",
                   "train_lowrank.rank=4"])
    assert one.returncode == 0, one.stderr[-3000:]
    for (dataset, variant), (ppl, _) in ppl_rows(tmp_path / "one").items():
        assert jobs[1]["ppl"][dataset][variant] == pytest.approx(ppl, rel=1e-5)


@pytest.mark.long
def test_distributed_benchmark_tiny(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/distributed.py", "--methods", "qllm", "--tiny-model-dir",
                           str(tiny_model_dir), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert [(r["method"], r["ranks"]) for r in result["runs"]] == [("qllm", 1), ("qllm", 2)]
    assert all(r["ppl_matches_1_rank"] for r in result["runs"])
    stages = {(row["ranks"], row["stage"]) for row in result["rows"]}
    assert {(1, "train_lowrank"), (2, "train_lowrank"), (2, "block stages"), (2, "job")} <= stages
    assert "| qllm | 2 |" in (tmp_path / "distributed.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "2,4"], "--ranks=2,4 must start with 1 (the baseline the speedup is of)"),
    (["--ranks", "1,x"], "--ranks='1,x' must be positive integers, comma-separated, e.g. 1,2"),
    (["--methods", "qllm,nope"], "--methods: unknown method 'nope'; choose from"),
])
def test_distributed_benchmark_refuses_bad_input(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/distributed.py", *argv, "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {message}") and len(proc.stderr.strip().splitlines()) == 1


def test_plan_is_per_rank(tmp_path):
    """pipeline.plan_only with pipeline.ranks=8: each rank streams its 16 of 128 windows (an eighth of the block
    streams), the device peak per GPU is one rank's, unchanged."""
    plans = {}
    for ranks in (1, 8):
        proc = run_cli(["model=llama2_70b", "method=rotation_qllm_gptq", "calibrate.n_samples=128", "calibrate.seq_len=2048",
                        "pipeline.plan_only=true", f"pipeline.ranks={ranks}", f"hydra.run.dir={tmp_path}/{ranks}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        plans[ranks] = json.loads((tmp_path / str(ranks) / "plan.json").read_text())
    assert plans[1]["windows_per_rank"] == 128 and plans[8]["windows_per_rank"] == 16
    assert plans[8]["resident"]["streams"] * 8 == plans[1]["resident"]["streams"]
    assert plans[8]["device_peak_bytes"] == plans[1]["device_peak_bytes"]
    assert plans[8]["host_peak_bytes"] < plans[1]["host_peak_bytes"]


def test_slurm_launcher_entry_composes():
    """conf/hydra/launcher/slurm.yaml on top of the plugin's submitit_slurm schema (nothing is submitted)."""
    proc = run_cli(["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=8", "--cfg", "hydra"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "tasks_per_node: 8" in proc.stdout and "max_num_timeout: 2" in proc.stdout


def test_planned_ranks_other_than_the_jobs_are_refused(tiny_model_dir, tmp_path):
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run"), "method=rtn", "pipeline.ranks=8"])
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: pipeline.ranks=8 but this job has 1 rank(s) (torchrun's --nproc_per_node); pipeline.ranks is for "
        "pipeline.plan_only: leave it null for a run"]
