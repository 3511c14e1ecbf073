"""The HTTP function: a stateless FastAPI app over the job store and object storage."""

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from handler.http import (audio_links, routes_chat, routes_files, routes_jobs, routes_lm, routes_lora, routes_models,
                          routes_release, routes_system)
from handler.http.errors import install_error_handlers
from pipeline.contract import GenerationRequest
from handler.http.services import Services, build_services
from handler.logs import install_access_log_filter
from handler.maintenance import Maintenance
from handler.metrics import api_registry
from handler.settings import Settings

# The reference server's browser origins (its route_setup.py): pages served from localhost or
# 127.0.0.1 on any port, and `null` (a page opened from a file, e.g. its ui/studio.html).
DEV_CORS_ORIGINS = ["null", "http://localhost", "http://127.0.0.1"]
DEV_CORS_ORIGIN_REGEX = r"^https?://(localhost|127\.0\.0\.1)(:\d+)?$"


def cors_policy(settings: Settings) -> tuple[list[str], str | None]:
    """(allowed origins, allowed-origin regex): ACESTEP_CORS_ORIGINS when set; else the reference's
    localhost list in dev and no cross-origin browser access in production."""
    if settings.cors_origins is not None:
        return [origin for origin in settings.cors_origins.split(",") if origin], None
    if settings.env == "dev":
        return list(DEV_CORS_ORIGINS), DEV_CORS_ORIGIN_REGEX
    return [], None


@asynccontextmanager
async def _background_work(app: FastAPI):
    """While the app runs, its share of the queue's maintenance (handler/maintenance.py): rescue jobs
    whose lease expired, prune expired jobs, deliver webhooks from the outbox. Whatever is left when
    it stops waits in the tables for the next process."""
    services: Services = app.state.services
    maintenance = Maintenance(
        services.store, services.storage, retention_seconds=services.settings.retention_seconds,
        webhooks=services.webhooks,
    )
    maintenance.start()
    yield
    maintenance.stop()


def install_metrics(app: FastAPI, services: Services) -> None:
    """GET /metrics on a registry of this app's own (handler/metrics.py)."""
    app.state.metrics_registry = api_registry(services, stale_seconds=routes_system.WORKER_STALE_SECONDS)
    app.include_router(routes_system.metrics_router)


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        lifespan=_background_work,
        title="ACE-Step 1.5 serverless API",
        version="0.1.0",
        description="Submit music generation jobs and poll them; jobs live in Postgres, audio in object storage.",
    )
    app.state.services = services
    origins, origin_regex = cors_policy(services.settings)
    if origins or origin_regex:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_origin_regex=origin_regex,
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "Authorization", "Idempotency-Key", "Range"],
            expose_headers=["Content-Length", "Content-Range", "Accept-Ranges", "Retry-After"],
        )
    app.include_router(routes_jobs.router)
    app.include_router(routes_system.router)
    app.include_router(routes_lora.router)  # before routes_models: its /v1/lora/* answer here
    app.include_router(routes_models.router)
    app.include_router(audio_links.router)
    app.include_router(routes_files.router)
    app.include_router(routes_release.router)
    app.include_router(routes_lm.router)
    app.include_router(routes_chat.router)
    if services.settings.metrics_enabled:
        install_metrics(app, services)

    install_error_handlers(app)

    schema = app.openapi()
    schema.setdefault("components", {}).setdefault("schemas", {})["GenerateRequest"] = GenerationRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    app.openapi_schema = schema
    return app


def app_from_environment() -> FastAPI:
    """An app configured from ACESTEP_* variables, for ASGI hosts (`uvicorn --factory`, Modal, Lambda)."""
    settings = Settings()
    if not settings.database_url:
        raise RuntimeError("ACESTEP_DATABASE_URL is not set: the HTTP function needs the job database")
    install_access_log_filter()
    return create_app(build_services(settings, settings.database_url))
