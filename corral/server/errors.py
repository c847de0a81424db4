"""One JSON error shape for every failure: {"error": {"code", "message", "fields"?}}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.domain.errors import IllegalTransition, StaleToken
from corral.server import metrics
from corral.server.routes import flat_routes, match
from corral.store.db import DatabaseConflict, DatabaseError
from corral.store.jobs import JobConflict, JobNotFound


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def _field_path(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse(
            error_body(exc.code, exc.message, **exc.extra), status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        fields = [
            {"field": _field_path(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
        return JSONResponse(
            error_body("invalid_request", summary or "invalid request", fields=fields),
            status_code=422,
        )

    @app.exception_handler(StaleToken)
    async def _stale(_req: Request, exc: StaleToken):
        return JSONResponse(error_body("stale_token", str(exc)), status_code=409)

    @app.exception_handler(JobNotFound)
    async def _no_job(_req: Request, exc: JobNotFound):
        return JSONResponse(error_body("not_found", f"job {exc.args[0]} not found"), 404)

    @app.exception_handler(JobConflict)
    async def _conflict(_req: Request, exc: JobConflict):
        return JSONResponse(error_body("conflict", str(exc)), status_code=409)

    @app.exception_handler(IllegalTransition)
    async def _illegal(_req: Request, exc: IllegalTransition):
        return JSONResponse(error_body("illegal_transition", str(exc)), status_code=409)

    @app.exception_handler(DatabaseConflict)
    async def _integrity(_req: Request, exc: DatabaseConflict):
        return JSONResponse(
            error_body("conflict", "the request conflicts with what is stored"), status_code=409
        )

    @app.exception_handler(DatabaseError)
    @app.exception_handler(ConnectionError)
    async def _database(_req: Request, exc: Exception):
        """The documented 503: the database did not answer (down, restarting, dropped
        connections). Nothing was half-written: each request is one transaction."""
        metrics.DATABASE_ERRORS.labels("request").inc()
        return JSONResponse(
            error_body(
                "database_unavailable",
                f"the database is unavailable ({exc.__class__.__name__}); try again",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return JSONResponse(  # e.g. bytes that are not UTF-8
                error_body(
                    "invalid_request",
                    "body: not valid JSON",
                    fields=[{"field": "body", "message": "not valid JSON (UTF-8)"}],
                ),
                status_code=422,
            )
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of every route on this path
            _, _, methods = match(flat_routes(req.app), req.url.path, req.method)
            headers["Allow"] = ", ".join(sorted(methods))
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)),
            status_code=exc.status_code,
            headers=headers or None,
        )
