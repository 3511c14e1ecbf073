"""Writes the pinned requirement sets of the Modal images (`requirements-api.lock`, `requirements-gpu.lock`)
from pyproject.toml's dependencies: pip resolves them for the containers (Linux x86_64, CPython 3.11) without
installing anything, and every package of the result is pinned.

    python infra/modal/lock.py            # both; needs the package index, takes a few minutes

Run it after changing the project's dependencies or the pins below; `tests/unit/test_modal_app.py`
fails while a lock misses a dependency of pyproject.toml.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The GPU image's torch: vllm pins torch exactly (vllm 0.32.0 -> torch 2.13.0, torchaudio 2.11.0), so the
# three move together. The wheels from PyPI are CUDA builds that carry their CUDA libraries (no CUDA base image).
GPU_PINS = ["torch==2.13.0", "torchaudio==2.11.0", "vllm==0.32.0"]
# What the API, maintenance and kicker functions never import (the HTTP function loads no model;
# pgserver is the embedded Postgres of `dev`): left out of the API image to keep it small and its start fast.
API_LEAVES_OUT = {"torch", "transformers", "diffusers", "safetensors", "peft", "pgserver", "huggingface-hub"}
GPU_LEAVES_OUT = {"pgserver"}
PYTHON_VERSION = "3.11"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[list[str], list[str]]:
    """(the project's dependencies, its `gpu` extra) as pyproject.toml lists them."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]), list(project["optional-dependencies"]["gpu"])


def wanted(kind: str) -> list[str]:
    """The top-level requirements of one image: `api` or `gpu`."""
    dependencies, gpu = project_requirements()
    if kind == "api":
        return [r for r in dependencies if requirement_name(r) not in API_LEAVES_OUT]
    skip = {requirement_name(p) for p in GPU_PINS} | GPU_LEAVES_OUT
    return GPU_PINS + [r for r in dependencies + gpu if requirement_name(r) not in skip]


def resolve(requirements: list[str]) -> list[str]:
    """pip's resolution of `requirements` for a Linux x86_64 CPython 3.11 container, as name==version lines."""
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 41)] + ["manylinux2014_x86_64", "linux_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
                   "--target", str(Path(tmp) / "target"), "--report", str(report)]
        for platform in platforms:
            command += ["--platform", platform]
        # PyPI alone: a machine's own pip configuration (constraints, local wheel folders and indexes,
        # such as a CPU build of torch) must not shape the containers' set
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "",
               "PIP_EXTRA_INDEX_URL": "", "PIP_INDEX_URL": "https://pypi.org/simple"}
        subprocess.run(command + requirements, check=True, env=env)
        installs = json.loads(report.read_text())["install"]
    return sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installs)


def write_lock(kind: str) -> Path:
    path = HERE / f"requirements-{kind}.lock"
    top = wanted(kind)
    lines = [
        f"# The {kind.upper()} image of infra/modal/app.py: every package pinned, resolved by `python infra/modal/lock.py`",
        f"# for Linux x86_64, CPython {PYTHON_VERSION}, from: {' '.join(top)}",
        *resolve(top),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    for which in sys.argv[1:] or ["api", "gpu"]:
        print("wrote", write_lock(which))
