"""The Modal app (infra/modal/app.py) as Modal's own SDK sees it, without an account: the files its
images ship (the mount listing Modal uploads from), the settings each function hands Modal (against
the table of infra/modal/README.md), the pinned requirement sets, and the kicker's pure decisions."""

import fnmatch
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import pytest

modal = pytest.importorskip("modal")  # the `modal` extra; the app cannot be read without its SDK

from modal._functions import _Function  # noqa: E402
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal.mount import _Mount, _select_files  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "infra" / "modal" / "app.py"
README = ROOT / "infra" / "modal" / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_app(path: Path = APP) -> tuple[object, dict[str, dict]]:
    """Import the app file as `modal deploy` does, recording what each function hands Modal
    (`_Function._from_local`, where every decorator's settings end up), by function tag."""
    handed: dict[str, dict] = {}
    original = _Function._from_local

    def recording(info, app, image, *args, **kwargs):
        handed[info.get_tag()] = kwargs | {"image": image}
        return original(info, app, image, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Function, "_from_local", staticmethod(recording))
        spec = importlib.util.spec_from_file_location(f"modal_app_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module, handed


@pytest.fixture(scope="module")
def loaded():
    return load_app()


def internal(obj):
    """The SDK's implementation object behind a public modal.* wrapper."""
    return synchronizer._translate_in(obj)


def shipped_files(image) -> dict[PurePosixPath, Path]:
    """Every local file an image adds to its containers (remote path -> local file): the mounts among
    the objects Modal's resolver loads for the image, listed as Modal's upload selects their files."""
    mounts, seen, stack = [], set(), [internal(image)]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _Mount):
            mounts.append(obj)
        else:
            stack.extend(obj._deps_())
    return {PurePosixPath(remote): Path(local) for mount in mounts for local, remote in _select_files(mount.entries)}


def package_files() -> dict[PurePosixPath, Path]:
    """What the package build ships, by where the containers import it from (/root/<package>/...):
    every .py of the packages and every file that pyproject's package-data globs match."""
    wanted: dict[PurePosixPath, Path] = {}
    packages = sorted({p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]})
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                wanted[PurePosixPath("/root", path.relative_to(ROOT).as_posix())] = path
    for package, globs in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        base = ROOT / package.replace(".", "/")
        for pattern in globs:
            for path in base.rglob("*"):
                if path.is_file() and fnmatch.fnmatch(path.relative_to(base).as_posix(), pattern):
                    wanted[PurePosixPath("/root", path.relative_to(ROOT).as_posix())] = path
    return wanted


def missing(image) -> list[str]:
    return sorted(str(remote) for remote in set(package_files()) - set(shipped_files(image)))


# --- the files ------------------------------------------------------------------------------------


def test_the_package_data_is_what_the_check_expects():
    wanted = {str(remote) for remote in package_files()}
    # the files whose absence broke the old deployment are among those checked
    assert {"/root/db/queries.sql", "/root/pipeline/data/qwen3_chat_template.jinja", "/root/handler/http/examples.json",
            "/root/migrations/script.py.mako", "/root/migrations/versions/0001_jobs_and_workers.py"} <= wanted


@pytest.mark.parametrize("image_name", ["api_image", "gpu_image"])
def test_every_image_ships_every_package_file(loaded, image_name):
    module, _ = loaded
    image = getattr(module, image_name)
    assert missing(image) == []
    shipped = shipped_files(image)
    assert not [r for r in shipped if r.suffix == ".pyc" or "__pycache__" in r.parts]
    for remote, local in package_files().items():
        assert shipped[remote].resolve() == local.resolve()


def test_the_check_fails_on_a_python_sources_only_image():
    """The old app's image (`add_local_python_source`: .py files only) is caught by the same check."""
    old = modal.Image.debian_slim().add_local_python_source("handler", "db", "pipeline", "migrations")
    assert {"/root/db/queries.sql", "/root/pipeline/data/qwen3_chat_template.jinja"} <= set(missing(old))


OLD_APP = """
import modal
image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libsndfile1")
    .pip_install_from_pyproject("pyproject.toml", optional_dependencies=["gpu"])
    .add_local_python_source("handler", "db", "pipeline", "migrations")
)
app = modal.App("acestep-serverless", image=image)
"""


def test_the_check_fails_on_the_old_app(tmp_path):
    (tmp_path / "app.py").write_text(OLD_APP)
    old, _ = load_app(tmp_path / "app.py")
    assert "/root/db/queries.sql" in missing(old.image)


def test_the_app_ships_the_same_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module, _ = load_app()
    assert missing(module.api_image) == [] and missing(module.gpu_image) == []
    assert module.ROOT == ROOT


def test_every_function_runs_on_an_image_that_ships_the_packages(loaded):
    module, handed = loaded
    for tag, kwargs in handed.items():
        assert missing(kwargs["image"]) == [], tag
        assert internal(kwargs["image"]) in (internal(module.api_image), internal(module.gpu_image)), tag


def test_the_shipped_files_alone_run_the_data_dependent_code(loaded, tmp_path):
    """Lay the API image's files out as a container gets them, then load the queries, the chat template,
    the examples and the migration history from there, in another directory than the repository."""
    module, _ = loaded
    for remote, local in shipped_files(module.api_image).items():
        target = tmp_path / "container" / remote.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(local.read_bytes())
    script = """
import json, sys
import db, db.sql
from pipeline.lm import prompts
from handler.http.routes_lm import load_examples
from alembic.script import ScriptDirectory
from migrations import alembic_config
assert db.__file__.startswith(sys.argv[1]), db.__file__
print(json.dumps({"queries": len(db.sql.queries()), "template": len(prompts.CHAT_TEMPLATE_PATH.read_text()),
                  "examples": len(load_examples()),
                  "heads": ScriptDirectory.from_config(alembic_config("postgresql://nowhere/none")).get_heads()}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "container" / "root")], cwd=tmp_path,
                          env={"PYTHONPATH": str(tmp_path / "container" / "root"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["queries"] > 10 and found["template"] > 100 and found["examples"] > 0 and len(found["heads"]) == 1


# --- the settings against the README --------------------------------------------------------------


def readme_table() -> dict[str, dict[str, str]]:
    lines = [line for line in README.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


def unset(cell: str) -> bool:
    return cell in ("–", "-")


def test_the_readme_lists_every_function(loaded):
    _, handed = loaded
    assert set(readme_table()) == {tag.split(".")[0] for tag in handed}


def test_each_function_has_the_settings_the_readme_gives(loaded):
    _, handed = loaded
    by_name = {tag.split(".")[0]: kwargs for tag, kwargs in handed.items()}
    for name, row in readme_table().items():
        got = by_name[name]
        assert (got.get("gpu") or "–") == row["gpu"], name
        cpu_memory = re.fullmatch(r"([\d.]+) core / (\d+) MiB", row["cpu / memory"])
        assert (got.get("cpu"), got.get("memory")) == (
            (float(cpu_memory[1]), int(cpu_memory[2])) if cpu_memory else (None, None)), name
        assert got["timeout"] == int(row["timeout s"]), name
        assert (got.get("min_containers") or 0) == int(row["min containers"]), name
        for key, column in (("max_containers", "max containers"), ("scaledown_window", "scaledown window s")):
            assert got.get(key) == (None if unset(row[column]) else int(row[column])), (name, key)
        inputs = [int(n) for n in row["inputs per container (max / target)"].split("/")]
        assert (got.get("max_concurrent_inputs") or 1, got.get("target_concurrent_inputs")) == (
            inputs[0], inputs[1] if len(inputs) > 1 else None), name
        schedule = got.get("schedule")
        if unset(row["schedule"]):
            assert schedule is None, name
        else:
            assert schedule.proto_message.period.seconds == int(re.fullmatch(r"every (\d+) s", row["schedule"])[1]), name
        volumes = {str(path): internal(volume)._name for path, volume in (got.get("volumes") or {}).items()}
        expected = {} if unset(row["volume"]) else {m[2]: m[1] for m in [re.fullmatch(r"(\S+) at (\S+)", row["volume"])]}
        assert volumes == expected, name
        secrets = sorted(internal(secret)._name for secret in got.get("secrets") or [])
        assert secrets == ([] if unset(row["secret"]) else [row["secret"]]), name


def test_the_api_is_an_asgi_app_and_the_gpu_class_gets_the_weights_volume(loaded):
    module, handed = loaded
    assert handed["api"]["webhook_config"].type == modal._functions.api_pb2.WEBHOOK_TYPE_ASGI_APP
    spec = internal(module.GpuWorker)._class_service_function._spec
    assert spec.gpus == "H100" and list(spec.volumes) == [module.CHECKPOINTS]
    assert isinstance(module.app, modal.App) and module.app.name == "acestep-serverless"


def test_the_readme_secret_command_sets_every_required_variable(loaded):
    module, _ = loaded
    text = README.read_text()
    command = text[text.index(f"modal secret create {module.SECRET_NAME}"):].split("```")[0]
    for variable in module.SECRET_REQUIRED_KEYS + ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        assert f"{variable}=" in command, variable
    assert internal(module.secret)._name == module.SECRET_NAME


# --- the pinned requirement sets -------------------------------------------------------------------


def lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "infra" / "modal" / name).read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[re.sub(r"[-_.]+", "-", requirement.name).lower()] = specifier.version
    return pins


def lock_module():
    spec = importlib.util.spec_from_file_location("modal_lock", ROOT / "infra" / "modal" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["api", "gpu"])
def test_each_lock_pins_every_requirement_of_its_image_within_pyproject(kind):
    locker = lock_module()
    pins = lock(f"requirements-{kind}.lock")
    for wanted in locker.wanted(kind):
        requirement = Requirement(wanted)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{wanted} is not in requirements-{kind}.lock: run python infra/modal/lock.py"
        assert requirement.specifier.contains(pins[name], prereleases=True), (wanted, pins[name])
    dependencies, gpu = locker.project_requirements()
    left_out = locker.API_LEAVES_OUT if kind == "api" else locker.GPU_LEAVES_OUT
    for dependency in dependencies + (gpu if kind == "gpu" else []):
        assert locker.requirement_name(dependency) in set(pins) | left_out, dependency


def test_the_gpu_lock_has_the_pinned_torch_and_the_api_lock_none():
    gpu, api = lock("requirements-gpu.lock"), lock("requirements-api.lock")
    assert (gpu["torch"], gpu["torchaudio"], gpu["vllm"]) == ("2.13.0", "2.11.0", "0.32.0")
    assert not {"torch", "transformers", "diffusers", "vllm", "pgserver"} & set(api)


def test_the_api_side_runs_without_what_its_image_leaves_out(loaded, tmp_path):
    """The API, the kicker's store and the maintenance round import and build with torch, transformers,
    diffusers, safetensors, peft, pgserver and huggingface_hub made unimportable, and every third-party
    package the project's loaded modules import is pinned in the API lock."""
    blocked = ["torch", "transformers", "diffusers", "safetensors", "peft", "pgserver", "huggingface_hub"]
    script = f"""
import ast, importlib.util, json, sys
from importlib.metadata import packages_distributions
for name in {blocked!r}:
    sys.modules[name] = None
from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings
from handler.backends import build_store
import handler.maintenance, migrations
settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none", data_dir={str(tmp_path)!r},
                    storage_url="s3://bucket/prefix", secret_key="k" * 32)
create_app(build_services(settings, settings.database_url))
build_store(settings, settings.database_url)
ours = [m for m in list(sys.modules.values()) if getattr(m, "__file__", None) and m.__name__.split(".")[0] in
        ("handler", "db", "pipeline", "migrations")]
imported = set()
for module in ours:
    for node in ast.walk(ast.parse(open(module.__file__).read())):
        if isinstance(node, ast.Import):
            imported |= {{alias.name.split(".")[0] for alias in node.names}}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
distributions = packages_distributions()
print(json.dumps({{"modules": sorted(m.__name__ for m in ours),
                  "third_party": {{name: distributions.get(name, []) for name in imported
                                  if name not in sys.stdlib_module_names and name not in
                                  ("handler", "db", "pipeline", "migrations")}}}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "handler.http.app" in found["modules"] and "handler.maintenance" in found["modules"]
    pins = set(lock("requirements-api.lock"))
    unpinned = {}
    for name, distributions in found["third_party"].items():
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions}
        if not names & pins:
            unpinned[name] = sorted(names)
    # what the loaded modules import lazily for other roles (the worker's pipeline, dev's embedded Postgres,
    # the RunPod SDK) is never reached by the API image's functions
    assert set(unpinned) <= {"torch", "transformers", "diffusers", "safetensors", "peft", "pgserver",
                             "huggingface_hub", "runpod"}, unpinned


# --- the decisions ----------------------------------------------------------------------------------


def fleet(module, **fields):
    from handler.platforms.scaling import Fleet

    return Fleet(**({"queued": 0, "expired_leases": 0, "draining": 0, "pending": 0} | fields))


def test_the_kicker_spawns_one_drain_per_waiting_job_up_to_the_cap(loaded):
    module, _ = loaded
    decide = module.kick_decision
    assert decide(fleet(module), cap=2).spawn == 0
    assert decide(fleet(module, queued=1), cap=2).spawn == 1
    assert decide(fleet(module, queued=10), cap=2).spawn == 2
    assert decide(fleet(module, queued=10, draining=1), cap=2).spawn == 1
    assert decide(fleet(module, queued=10, draining=1, pending=1), cap=2).spawn == 0
    assert decide(fleet(module, queued=1, pending=1), cap=2).spawn == 0  # the last round's spawn is on its way
    assert decide(fleet(module, queued=5, draining=3), cap=2).spawn == 0  # over the cap (a lowered cap): none


def test_the_kicker_counts_expired_leases_as_work(loaded):
    module, _ = loaded
    decision = module.kick_decision(fleet(module, expired_leases=1), cap=2)
    assert decision.spawn == 1 and "1 expired leases" in decision.reason


def test_the_kicker_holds_off_after_a_setup_failure(loaded):
    module, _ = loaded
    failed = datetime(2026, 11, 28, 7, 0, tzinfo=timezone.utc)
    decision = module.kick_decision(fleet(module, queued=3, setup_failed_at=failed), cap=2)
    assert decision.spawn == 0 and "failed to load the models" in decision.reason


def test_the_drain_budget_is_the_timeout_less_a_margin(loaded):
    module, _ = loaded
    settings = SimpleNamespace(job_timeout_seconds=1800.0, shutdown_grace_seconds=30.0)
    assert module.drain_budget(settings, timeout=3600) == 3600 - module.DRAIN_MARGIN_SECONDS
    assert module.drain_budget(settings, timeout=90) == 60.0  # a floor: a drain always gets to claim
    assert module.drain_budget(settings) < module.GPU_TIMEOUT
