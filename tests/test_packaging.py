"""The wheel carries ssdbench.kernels, ssdbench.tasks and the Hydra configs (ssdbench.conf):
build it, install it into a fresh virtual environment, run the CLI from outside the repo."""
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_outside_repo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, timeout=300)
    (wheel,) = wheels.glob("ssdbench-*.whl")
    # The environment sees the system's packages (torch, hydra, ...) but gets its own ssdbench.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import ssdbench.conf, ssdbench.kernels, ssdbench.tasks.mqar;"
                            "print(ssdbench.conf.__file__)"], cwd=work, capture_output=True, text=True,
                           check=True).stdout
    assert str(env_dir) in where, f"imported {where} instead of the wheel"
    out = subprocess.run([str(env_dir / "bin" / "ssdbench"), "run", "--help"], cwd=work,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "model: based, mamba1, mamba2, transformerpp" in out.stdout and "task: induction_heads, mqar, pile, selective_copying" in out.stdout
    cfg = subprocess.run([str(env_dir / "bin" / "ssdbench"), "run", "--cfg", "job", "model.d_model=48"],
                         cwd=work, capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0 and "d_model: 48" in cfg.stdout, cfg.stderr


def test_ci_runs_the_readme_commands():
    """CI must prove the README's two commands, so .ci/run contains them verbatim."""
    import re

    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2, commands
    ci = (REPO / ".ci" / "run").read_text()
    for c in commands:
        assert c in ci
