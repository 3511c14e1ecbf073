"""The RunPod trigger against a stand-in of RunPod's endpoint API (/health, /run) on 127.0.0.1 and the
real job store: drains start for queued jobs and expired leases, up to the cap, none after a setup
failure, and RunPod's refusals are errors."""

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from db import NewJob, WorkerState
from handler.platforms.runpod_trigger import RunpodEndpoint, RunpodError, trigger_round
from tests.acceptance.worker_harness import ROOT, submit


class EndpointStandIn:
    def __init__(self, key: str = "rp-key", in_progress: int = 0, in_queue: int = 0):
        self.runs: list[dict] = []
        self.health = {"jobs": {"inProgress": in_progress, "inQueue": in_queue, "completed": 0}}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.headers.get("Authorization") != f"Bearer {key}":
                    return self._answer(401, {"error": "Unauthorized"})
                self._answer(200, standin.health) if self.path == "/v2/ep1/health" else self._answer(404, {})

            def do_POST(self):
                if self.headers.get("Authorization") != f"Bearer {key}":
                    return self._answer(401, {"error": "Unauthorized"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.runs.append(body)
                self._answer(200, {"id": f"run-{len(standin.runs)}", "status": "IN_QUEUE"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v2"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def runpod_api():
    api = EndpointStandIn()
    yield api
    api.close()


def expired_job(store) -> None:
    then = datetime.now(timezone.utc) - timedelta(seconds=store.lease_seconds + 30)
    store.submit(NewJob(request={}), now=then)
    assert store.claim("killed-drain", 1, now=then)


def test_drains_start_for_queued_jobs_and_expired_leases_up_to_the_cap(store, runpod_api):
    endpoint = RunpodEndpoint("ep1", "rp-key", base_url=runpod_api.url)
    assert trigger_round(store, endpoint, cap=3, budget_seconds=300).spawn == 0 and runpod_api.runs == []
    expired_job(store)  # a killed drain's job: running, its lease run out, queue_depth 0
    assert store.stats()["queue_depth"] == 0
    assert trigger_round(store, endpoint, cap=3, budget_seconds=300).spawn == 1
    assert runpod_api.runs == [{"input": {"mode": "drain", "time_budget_seconds": 300}}]
    for i in range(5):
        submit(store, caption=str(i), batch_size=1)
    runpod_api.health["jobs"] = {"inProgress": 1, "inQueue": 0}  # the first drain is running
    assert trigger_round(store, endpoint, cap=3, budget_seconds=300).spawn == 2  # 6 jobs of work, 1 in flight, cap 3
    runpod_api.health["jobs"] = {"inProgress": 1, "inQueue": 2}
    assert trigger_round(store, endpoint, cap=3, budget_seconds=300).spawn == 0
    assert len(runpod_api.runs) == 3


def test_no_drain_starts_while_workers_cannot_load_their_models(store, runpod_api):
    submit(store, caption="waits", batch_size=1)
    store.register_worker("no-weights", host="h", capacity=1, models=[], state=WorkerState.SETUP_FAILED)
    decision = trigger_round(store, RunpodEndpoint("ep1", "rp-key", base_url=runpod_api.url), cap=2, budget_seconds=60)
    assert decision.spawn == 0 and "failed to load the models" in decision.reason and runpod_api.runs == []


def test_a_refused_key_is_an_error(store, runpod_api):
    submit(store, caption="waits", batch_size=1)
    with pytest.raises(RunpodError, match="401"):
        trigger_round(store, RunpodEndpoint("ep1", "wrong", base_url=runpod_api.url), cap=2, budget_seconds=60)


def test_the_command_runs_one_round(db_url, store, runpod_api):
    submit(store, caption="waits", batch_size=1)
    env = {"ACESTEP_DATABASE_URL": db_url, "ACESTEP_RUNPOD_ENDPOINT_ID": "ep1", "ACESTEP_RUNPOD_API_KEY": "rp-key",
           "ACESTEP_RUNPOD_API_URL": runpod_api.url, "ACESTEP_RUNPOD_DRAIN_BUDGET_SECONDS": "120", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "handler.platforms.runpod_trigger", "--once"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 drains started" in done.stdout and runpod_api.runs == [{"input": {"mode": "drain", "time_budget_seconds": 120.0}}]
    missing = subprocess.run([sys.executable, "-m", "handler.platforms.runpod_trigger", "--once"], cwd=ROOT,
                             env={"PATH": "/usr/bin:/bin", "ACESTEP_DATABASE_URL": db_url}, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "ACESTEP_RUNPOD_ENDPOINT_ID, ACESTEP_RUNPOD_API_KEY" in missing.stderr
