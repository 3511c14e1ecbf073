"""A field added to the contract's GenerationRequest, and nothing else, travels the whole way: the
HTTP function validates it (422 naming it when out of range), the job row stores it, the worker
rebuilds it, the pipeline child (a real spawned process) receives it. Run on a copy of the source
whose only change is that one line in pipeline/contract.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANCHOR = "    webhook_url: str | None = Field("
PROBE = '    probe_level: int = Field(3, ge=0, le=9, description="a field no other file knows")\n'

SCRIPT = r"""
import json, sys, time
from fastapi.testclient import TestClient
from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings
from handler.worker.worker import worker_from_settings

db_url, objects = sys.argv[1], sys.argv[2]
settings = Settings(_env_file=None, database_url=db_url, storage_url="file://" + objects, secret_key="k" * 32,
                    pipeline="tests.fakes.pipelines:echo", heartbeat_seconds=0.5, lease_seconds=5)
out = {}
with TestClient(create_app(build_services(settings, db_url))) as client:
    out["refused"] = client.post("/v1/music/generate", json={"caption": "x", "probe_level": 12}).json()
    given = client.post("/v1/music/generate", json={"caption": "x", "probe_level": 7}).json()["job_id"]
    default = client.post("/v1/music/generate", json={"caption": "y"}).json()["job_id"]
    worker = worker_from_settings(settings, once=True)
    out["worker_exit"] = worker.run()
    out["given"] = client.get(f"/v1/jobs/{given}").json()
    out["default"] = client.get(f"/v1/jobs/{default}").json()
print("RESULT " + json.dumps(out))
"""


def copy_with_probe(target: Path) -> None:
    for package in ("handler", "db", "pipeline", "migrations"):
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "tests" / "fakes").mkdir(parents=True)
    for name in ("__init__.py", "fakes/__init__.py", "fakes/pipelines.py"):
        shutil.copy(ROOT / "tests" / name, target / "tests" / name)
    contract = target / "pipeline" / "contract.py"
    text = contract.read_text()
    assert text.count(ANCHOR) == 1
    contract.write_text(text.replace(ANCHOR, PROBE + ANCHOR))


def test_a_field_added_to_the_contract_reaches_the_pipeline(tmp_path, db_url):
    copy_with_probe(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")} | {"PYTHONPATH": str(tmp_path / "src")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, db_url, str(tmp_path / "objects")], cwd=tmp_path / "src",
                          env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout + done.stderr
    out = json.loads(lines[0].removeprefix("RESULT "))
    assert [e["field"] for e in out["refused"]["detail"]] == ["probe_level"]
    assert out["worker_exit"] == 0
    for job, expected in ((out["given"], 7), (out["default"], 3)):
        assert job["status"] == "succeeded", job
        info = job["result"]["generation_info"]  # "Steps: .., Scale: .., Seeds: .., <what the pipeline said>"
        ran = json.loads(info[info.index("{"):])  # what the pipeline in the child received
        assert ran["probe_level"] == expected
