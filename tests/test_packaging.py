"""The wheel carries ssdbench.kernels, ssdbench.tasks and the Hydra configs (ssdbench.conf):
build it, install it into a fresh virtual environment, run the CLI from outside the repo."""
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _site_dirs() -> list[str]:
    """The site-packages directories this interpreter imports from, in its own order: a
    virtual environment's (and, with system site packages, its base's) or the system's, and the
    user site where it is on."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.insert(0, site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def _env_without_repo() -> dict[str, str]:
    """This process's environment with the repo dropped from PYTHONPATH: the GPU machine runs
    the suite from a checkout with PYTHONPATH=<wheels>:<repo> (scripts/device.sh), and the repo
    entry would shadow the installed wheel. Other entries (the carried wheels) stay."""
    env = dict(os.environ)
    keep = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != REPO]
    env.pop("PYTHONPATH", None)
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def test_wheel_installs_and_runs_outside_repo(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(REPO)], check=True, timeout=300)
    (wheel,) = wheels.glob("ssdbench-*.whl")
    # The environment sees the packages of the interpreter running the tests (torch, hydra, ...)
    # but gets its own ssdbench. Not system_site_packages=True: inside a virtual environment
    # (sys.prefix != sys.base_prefix) that is the base interpreter's site-packages, which need
    # not hold torch at all. A .pth file adds this interpreter's site directories after the new
    # environment's own, processing their .pth files as system site packages would.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_ssdbench_test_outer_site.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in _site_dirs()) + "\n")
    env = _env_without_repo()
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   env=env)

    # The torch it imports is the one these tests run with (in a venv with system_site_packages,
    # the base interpreter's torch, or none).
    import torch

    seen = subprocess.run([str(py), "-c", "import torch; print(torch.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr
    assert Path(seen.stdout.strip()) == Path(torch.__file__), (seen.stdout, torch.__file__)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import ssdbench.conf, ssdbench.kernels, ssdbench.tasks.mqar;"
                            "print(ssdbench.conf.__file__)"], cwd=work, capture_output=True, text=True,
                           check=True, env=env).stdout
    assert str(env_dir) in where, f"imported {where} instead of the wheel"
    out = subprocess.run([str(env_dir / "bin" / "ssdbench"), "run", "--help"], cwd=work,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "model: based, mamba1, mamba2, transformerpp" in out.stdout and "task: induction_heads, mqar, pile, selective_copying" in out.stdout
    cfg = subprocess.run([str(env_dir / "bin" / "ssdbench"), "run", "--cfg", "job", "model.d_model=48"],
                         cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert cfg.returncode == 0 and "d_model: 48" in cfg.stdout, cfg.stderr


def test_ci_runs_the_readme_commands():
    """CI must prove the README's two commands, so .ci/run contains them verbatim, runs them in a
    fresh virtual environment as a newcomer would (not in whatever the machine's Python has), and
    exits with the status of the one that fails (a `set -e` script does not stop at a failure
    before the last `&&`)."""
    import re

    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(pip install [^\n]+)\n```", readme)
    assert len(commands) == 2, commands
    ci = (REPO / ".ci" / "run").read_text()
    for c in commands:
        assert c in ci
        assert re.search("^" + re.escape(c) + r' \|\| fail "[^"]*" \$\?$', ci, re.M), c
    venv_at, activate_at = ci.find("python3 -m venv "), ci.find("/bin/activate")
    assert 0 <= venv_at < activate_at < min(ci.find(c) for c in commands)
