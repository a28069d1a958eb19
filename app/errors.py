"""One error shape for every 4xx and 5xx: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import metrics


class ApiError(Exception):
    """An answer other than success, raised anywhere below a route."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The error shape every answer and every published error message has."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid_input(message: str) -> ApiError:
    return ApiError(422, "invalid_input", message)


def invalid_fields(errors: list[dict[str, Any]]) -> ApiError:
    """422 for pydantic's validation ``errors``, each field written as ``modalities.accelerometer[3][1]``."""
    details = [{"field": _location(tuple(e["loc"])), "message": e["msg"], "type": e["type"]} for e in errors]
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return ApiError(422, "invalid_input", f"{first['field']}: {first['message']}{more}", details=details)


def unavailable(code: str, message: str, retry_after: int) -> ApiError:
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})


def error_response(error: ApiError) -> JSONResponse:
    metrics.ERRORS.labels(reason=error.code).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "modalities", "accelerometer", 3, 1) -> "modalities.accelerometer[3][1]"
    text = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(invalid_fields(list(exc.errors())))


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    code = codes.get(exc.status_code, "http_error")
    return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(500, "internal_error", f"internal error: {type(exc).__name__}"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
