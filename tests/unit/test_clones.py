"""Two clones with different code share one venv (keyed by the lock file), and each runs its own code:
the venv holds no clipcap, and `scripts/bin/clipcap` (what dvc.yaml calls) always runs the src/ beside it."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _clone(target: Path, version: str) -> Path:
    """The parts of a clone that set up and run clipcap, with its own version string."""
    for part in ("scripts", "src"):
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "requirements.lock", target / "requirements.lock")
    init = target / "src/clipcap/__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', f'__version__ = "{version}"'))
    return target


def _bash(script: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")


def test_each_clone_runs_its_own_code_from_one_shared_venv(tmp_path):
    a, b = _clone(tmp_path / "a", "0.1.0+a"), _clone(tmp_path / "b", "0.1.0+b")
    out = _bash(f"""
        source {a}/scripts/env.sh >/dev/null; echo "$CLIPCAP_VENV"
        source {b}/scripts/env.sh >/dev/null; echo "$CLIPCAP_VENV"   # b's set-up last, as a user switching clones
        {a}/scripts/bin/clipcap --version                            # what a stage of a's dvc.yaml runs
        (cd {a} && scripts/bin/clipcap --version)
        clipcap --version                                            # the command on PATH: b's
        env -u PYTHONPATH python -c "import importlib.util as u; print(u.find_spec('clipcap'))"
    """)
    venv_a, venv_b, by_path, by_path_in_a, on_path, in_venv = out[:6]
    assert venv_a == venv_b  # one venv for both: the same lock file
    assert by_path == by_path_in_a == f"clipcap 0.1.0+a ({a / 'src/clipcap'})"
    assert on_path == f"clipcap 0.1.0+b ({b / 'src/clipcap'})"
    assert in_venv == "None"  # no clipcap installed in the shared venv for a clone to re-point
