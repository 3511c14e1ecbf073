"""A stand-in for RunPod's worker API on 127.0.0.1, as the runpod SDK (1.12) talks to it in production
mode: job-take (GET, 204 when there is nothing), job-stop (GET, the long-polled stop channel),
job-done (POST: progress with status IN_PROGRESS, then the result), job-stream and ping."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class RunpodStandIn:
    def __init__(self):
        self.jobs: list[dict] = []
        self.stops: list[str] = []
        self.posts: dict[str, list[dict]] = {}  # job id -> every job-done POST, in order
        self.streams: dict[str, list[dict]] = {}
        self.taken: list[str] = []
        self.pings = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = urlparse(self.path).path
                if path.startswith("/job-take/"):  # long-polled, as RunPod's is: held until a job comes or 2 s pass
                    with standin._arrived:
                        standin._arrived.wait_for(lambda: standin.jobs, timeout=2.0)
                        job = standin.jobs.pop(0) if standin.jobs else None
                        if job is not None:
                            standin.taken.append(job["id"])
                    if job is None:
                        self._answer(204)
                    else:
                        self._answer(200, job)
                elif path.startswith("/job-stop/"):
                    with standin._lock:
                        stops, standin.stops = standin.stops, []
                    self._answer(200, {"jobsToStop": stops}) if stops else self._answer(204)
                elif path.startswith("/ping/"):
                    standin.pings += 1
                    self._answer(200, {})
                else:
                    self._answer(404)

            def do_POST(self):
                url = urlparse(self.path)
                job_id = parse_qs(url.query)["id"][0]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                target = standin.posts if url.path.startswith("/job-done/") else standin.streams
                with standin._lock:
                    target.setdefault(job_id, []).append(body)
                self._answer(200, {})

            def _answer(self, status: int, body: dict | None = None):
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        """What RunPod sets in a serverless worker's container, pointed at this stand-in."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=stand-in",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID?id=$ID",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID?id=$ID",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID",
            "RUNPOD_POD_ID": "pod-stand-in",
            "RUNPOD_AI_API_KEY": "stand-in-key",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # no disk/memory fitness checks on a test machine
        }

    def add_job(self, job_id: str, job_input: dict) -> None:
        with self._arrived:
            self.jobs.append({"id": job_id, "input": job_input})
            self._arrived.notify_all()

    def stop(self, job_id: str) -> None:
        with self._lock:
            self.stops.append(job_id)

    def final(self, job_id: str) -> dict | None:
        """The job's result POST (the one that is not progress), if it came."""
        with self._lock:
            done = [p for p in self.posts.get(job_id, []) if p.get("status") != "IN_PROGRESS"]
        return done[-1] if done else None

    def progress(self, job_id: str) -> list:
        with self._lock:
            return [p["output"] for p in self.posts.get(job_id, []) if p.get("status") == "IN_PROGRESS"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
