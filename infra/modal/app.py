"""Modal deployment: the HTTP function as an ASGI web endpoint, and a GPU drain function that scales
to zero. A scheduled kicker starts the GPU function when jobs are queued.

    modal deploy infra/modal/app.py       (secret "acestep" holds the ACESTEP_* variables)
"""

import modal  # the Modal SDK: only needed to deploy

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("libsndfile1")
    .pip_install_from_pyproject("pyproject.toml", optional_dependencies=["gpu"])
    .add_local_python_source("handler", "db", "pipeline", "migrations")
)
app = modal.App("acestep-serverless", image=image, secrets=[modal.Secret.from_name("acestep")])
checkpoints = modal.Volume.from_name("acestep-checkpoints", create_if_missing=True)


@app.function(min_containers=0)
@modal.asgi_app()
def api():
    from handler.http.app import app_from_environment

    return app_from_environment()


@app.cls(gpu="H100", volumes={"/checkpoints": checkpoints}, timeout=3600, scaledown_window=120, min_containers=0)
class GpuWorker:
    @modal.enter()
    def load(self) -> None:
        from handler.drain import Drainer
        from handler.settings import Settings

        self.drainer = Drainer(Settings(checkpoint_dir="/checkpoints"))

    @modal.method()
    def drain(self, time_budget_seconds: float = 3000.0) -> dict:
        return self.drainer.drain(time_budget_seconds)

    @modal.exit()
    def unload(self) -> None:
        self.drainer.close()


@app.function(schedule=modal.Period(seconds=30))
def kick() -> None:
    """Start a GPU container when work is queued (the function itself exits when the queue is empty)."""
    from db import JobStore, make_engine
    from handler.settings import Settings

    settings = Settings()
    store = JobStore(make_engine(settings.database_url, pool_size=1))
    if store.stats()["queue_depth"] > 0:
        GpuWorker().drain.spawn()
