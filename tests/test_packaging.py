"""A wheel built from the repository installs into a fresh virtual environment and runs: conf/ ships inside it."""
import os
import site
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO, tiny_overrides


def running_site_dirs() -> list[str]:
    """The site-packages of the interpreter running the tests, whatever it is: a base interpreter, a venv or conda.

    `venv --system-site-packages` would expose the *base* interpreter's packages, which inside a venv lack torch & co.
    """
    dirs = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def test_wheel_installs_and_runs_a_tiny_job(tiny_model_dir, tmp_path):
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                            str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert build.returncode == 0, f"building the wheel failed (setuptools is in the test extra):\n{build.stderr[-2000:]}"
    (wheel,) = wheels.glob("qllm_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qllm_pipeline/stages/__init__.py" in names and "qllm_pipeline/conf/config.yaml" in names
    assert not [n for n in names if n.split("/")[0] not in ("qllm_pipeline",) and ".dist-info/" not in n], names
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # a checkout on it (with the egg-info the build writes) would read as installed
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert pip.returncode == 0, pip.stderr[-2000:]
    # torch & co. come from the running environment, appended after the venv's own site-packages by a .pth of plain
    # paths: those directories' own .pth files (an editable install of this checkout) are not run, so the package and
    # its conf can come only from the wheel.
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    with open(os.path.join(venv_site, "_running_env.pth"), "w") as pth:
        pth.write("".join(d + "\n" for d in running_site_dirs()))
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qllm_pipeline.core.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert where.returncode == 0, f"the installed wheel does not import in its venv:\n{where.stderr[-2000:]}"
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
