"""Hydra multirun reuses cached stages and writes a sweep summary; W&B offline mode records the metrics."""
import json

import pytest

from conftest import run_cli, tiny_overrides


def test_two_job_multirun_reuses_upstream_and_summarises(tiny_model_dir, tmp_path):
    args = [a for a in tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "unused") if not a.startswith("hydra.run")]
    proc = run_cli(["-m", *args, f"hydra.sweep.dir={tmp_path}/sweep", "train_lowrank.rank=2,4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1)]
    second = {s["stage"]: s for s in jobs[1]["stages"]}
    # The second job only differs in the LRC rank: calibration and block 0's stages before train_lowrank come from
    # the cache; blocks 1.. get different inputs (block 0 now has a rank-2 correction), so they are recomputed.
    assert second["calibrate"]["computed"] == 0 and second["calibrate"]["cached"] == 1
    for stage in ("collect_activations", "search_theta", "reassemble"):
        assert second[stage]["cached"] == 1 and second[stage]["computed"] == 2, stage
    assert second["train_lowrank"]["computed"] == 3
    assert second["evaluate"]["cached"] == 2  # fp and rtn rows
    summary = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert "train_lowrank.rank=2" in summary and "train_lowrank.rank=4" in summary
    rows = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert len(rows) == 2 and rows[0]["wiki_sample/cra+lrc"] != rows[1]["wiki_sample/cra+lrc"]
    assert "calibrate" in rows[1]["cache_hits"]


def test_wandb_offline_run_records_metrics(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        [*tiny_overrides(tiny_model_dir, tmp_path / "cache", run_dir), "logger=wandb",
         "pipeline.stages=[calibrate,collect_activations,fuse,evaluate]"], in_process=False,  # wandb's own service
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run's transaction log (protobuf) holds the summary keys and their JSON-encoded values.
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    results = json.loads((run_dir / "results.json").read_text())
    assert b"ppl/wiki_sample/rtn" in log and json.dumps(results["ppl"]["wiki_sample"]["rtn"]).encode() in log
    assert b"stage/fuse/seconds" in log


def test_zeroshot_smoke_task_through_the_pipeline(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["pipeline.stages=[calibrate,collect_activations,fuse,evaluate]", "eval.tasks=[qllm_smoke]", "eval.limit=8"]
    proc = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", run_dir), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for variant in ("fp", "rtn"):
        acc = results["zeroshot"][variant]["tasks"]["qllm_smoke"]["acc"]
        assert 0.0 <= acc <= 1.0 and results["zeroshot"][variant]["tasks"]["qllm_smoke"]["n"] == 8
    assert "Zero-shot accuracy" in (run_dir / "results.md").read_text()
    again = run_cli([*tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "run2"), *extra])
    assert again.returncode == 0
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["zeroshot"] == results["zeroshot"]  # cached, same


@pytest.mark.long
def test_parallel_multirun_on_one_cache_computes_each_artifact_once(tiny_model_dir, tmp_path):
    """Hydra's joblib launcher runs three jobs at once on one cache; per-key locks make the shared artifacts
    (calibration, block 0's stages up to train_lowrank, the fp and rtn rows) computed by one job and read by the others."""
    args = [a for a in tiny_overrides(tiny_model_dir, tmp_path / "cache", tmp_path / "unused") if not a.startswith("hydra.run")]
    proc = run_cli(["-m", *args, f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
                    "train_lowrank.rank=2,3,4"], in_process=False)  # the launcher starts worker processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib" in proc.stdout + proc.stderr  # really the parallel launcher
    jobs = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1, 2)]
    computed = {}
    for job in jobs:
        for s in job["stages"]:
            computed[s["stage"]] = computed.get(s["stage"], 0) + s["computed"]
    assert computed["calibrate"] == 1
    for stage in ("collect_activations", "search_theta", "reassemble"):
        assert computed[stage] == 1 + 3 * 2, stage  # block 0 shared, blocks 1-2 differ per rank
    assert computed["train_lowrank"] == 9
    assert computed["evaluate"] == 2 + 3 * 2  # fp and rtn once; each job's own cra and cra+lrc rows
    # nothing half-written, every artifact sealed
    from qllm_pipeline.core.cache import verify

    artifacts = [d for d in (tmp_path / "cache").glob("*/*") if not d.parent.name.startswith(".")]
    assert artifacts and all(verify(d) is None for d in artifacts)
    assert not [d for d in artifacts if ".tmp-" in d.name or ".trash-" in d.name]
