"""The HTTP function: a stateless FastAPI app over the job store and object storage."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from db import DatabaseUnavailable, StoreError
from handler.http import routes_chat, routes_jobs, routes_lm, routes_release, routes_system
from pipeline.contract import GenerationRequest
from handler.http.services import Services, build_services
from handler.maintenance import Maintenance
from handler.settings import Settings
from handler.storage import StorageError, StorageUnavailable

log = logging.getLogger(__name__)


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


def create_app(services: Services) -> FastAPI:
    app = FastAPI(
        lifespan=_background_work,
        title="ACE-Step 1.5 serverless API",
        version="0.1.0",
        description="Submit music generation jobs and poll them; jobs live in Postgres, audio in object storage.",
    )
    app.state.services = services
    app.include_router(routes_jobs.router)
    app.include_router(routes_system.router)
    app.include_router(routes_release.router)
    app.include_router(routes_lm.router)
    app.include_router(routes_chat.router)

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(StorageUnavailable)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "service temporarily unavailable; retry shortly"}, 503, {"Retry-After": "5"})

    @app.exception_handler(StoreError)
    @app.exception_handler(StorageError)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc, extra={"action": "http_error", "path": request.url.path})
        return JSONResponse({"detail": "internal error in the job service"}, 500)

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
    return create_app(build_services(settings, settings.database_url))
