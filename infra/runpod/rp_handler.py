"""RunPod serverless handler: every invocation drains the Postgres job queue until it is empty or the
time budget runs out, and returns a summary. Configure with the same ACESTEP_* variables as `worker`.

    input: {"time_budget_seconds": 540}     (default 540; keep it under the endpoint's execution timeout)
"""

import runpod  # the RunPod SDK: present in the RunPod image only

from handler.drain import Drainer
from handler.settings import Settings

DEFAULT_BUDGET_SECONDS = 540.0
_drainer: Drainer | None = None  # kept across invocations of a warm worker: models stay loaded


def handler(event: dict) -> dict:
    global _drainer
    if _drainer is None:
        _drainer = Drainer(Settings())
    budget = float((event.get("input") or {}).get("time_budget_seconds", DEFAULT_BUDGET_SECONDS))
    return _drainer.drain(budget)


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
