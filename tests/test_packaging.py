"""A wheel built from the repository installs into a fresh virtual environment and runs: conf/ ships inside it."""
import os
import subprocess
import sys

from conftest import REPO, tiny_overrides


def test_wheel_installs_and_runs_a_tiny_job(tiny_model_dir, tmp_path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                            str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("qllm_pipeline-*.whl")
    # --system-site-packages: torch & co. come from this interpreter; the package itself only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qllm_pipeline.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    module_file, conf_dir = where.stdout.split()
    assert module_file.startswith(str(venv)) and conf_dir.startswith(str(venv)), where.stdout  # not the checkout
    helped = subprocess.run([str(venv / "bin" / "qllm-pipeline"), "--help"], capture_output=True, text=True, cwd=work,
                            env=env, timeout=120)
    assert helped.returncode == 0 and "method: " in helped.stdout, helped.stderr[-2000:]
    args = [a for a in tiny_overrides(tiny_model_dir, work / "cache", work / "run") if not a.startswith("model=")]
    job = subprocess.run([str(venv / "bin" / "qllm-pipeline"), *args, "method=rtn", "eval.max_windows=2"],
                         capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    assert (work / "run" / "results.json").is_file()
