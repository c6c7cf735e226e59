"""Typed exceptions. Every error the daemon answers becomes one of these, carrying the
daemon's own message, its error code (``ConflictException``...) and HTTP status."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Type


class HearthError(Exception):
    """Base of every error this SDK raises."""

    def __init__(self, message: str, *, code: str = "", status: int = 0, details: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        #: The daemon's message (what to do about it, usually).
        self.message = message
        #: The error code the daemon answered (``ValidationException``...), or ``""``.
        self.code = code
        #: The HTTP status, or 0 for errors raised on this side.
        self.status = status
        #: The rest of the error body (``resourceId``, ``quotaCode``...).
        self.details: Dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


class ConfigurationError(HearthError):
    """No daemon URL or no credentials: set ``HEARTH_URL`` (or
    ``AWS_ENDPOINT_URL_LAMBDA_MICROVMS``) and AWS credentials (environment, profile...)."""


class ValidationError(HearthError):
    """The request was refused as invalid (400)."""


class NotFoundError(HearthError):
    """No such sandbox, image, file or path (404)."""


class ConflictError(HearthError):
    """Not possible in the sandbox's current state, e.g. it is SUSPENDED or ending (409)."""


class AuthError(HearthError):
    """Unknown access key, bad signature, or not allowed (403)."""


class QuotaExceededError(HearthError):
    """The account's quota is used up (402)."""


class ThrottlingError(HearthError):
    """Too many requests for the account; retry later (429)."""


class CapacityError(HearthError):
    """The host has no room for another sandbox right now."""


class ServerError(HearthError):
    """The daemon failed (5xx)."""


class SandboxError(HearthError):
    """The sandbox did not start, or ended (its ``stateReason`` is the message)."""


class CommandError(HearthError):
    """A command run with ``check=True`` exited non-zero; ``result`` holds its output."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


_BY_CODE: Dict[str, Type[HearthError]] = {
    "ValidationException": ValidationError,
    "BadRequestException": ValidationError,
    "UnsupportedMediaTypeException": ValidationError,
    "PayloadTooLargeException": ValidationError,
    "ResourceNotFoundException": NotFoundError,
    "UnknownOperationException": NotFoundError,
    "ConflictException": ConflictError,
    "AccessDeniedException": AuthError,
    "UnrecognizedClientException": AuthError,
    "InvalidSignatureException": AuthError,
    "ExpiredTokenException": AuthError,
    "ServiceQuotaExceededException": QuotaExceededError,
    "ThrottlingException": ThrottlingError,
    "InsufficientCapacityException": CapacityError,
    "InternalServerException": ServerError,
}


def from_response(status: int, code: Optional[str], body: bytes) -> HearthError:
    """The exception for an error answer of the daemon (its ``x-amzn-errortype`` header
    and JSON body)."""
    details: Dict[str, Any] = {}
    message = body.decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            details = parsed
            message = str(parsed.get("message") or parsed.get("Message") or message)
    except ValueError:
        pass
    code = (code or "").split(":")[0]
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = {400: ValidationError, 402: QuotaExceededError, 403: AuthError, 404: NotFoundError, 409: ConflictError, 429: ThrottlingError}.get(
            status, ServerError if status >= 500 else HearthError
        )
    return cls(message or f"HTTP {status}", code=code, status=status, details=details)


def from_client_error(e: Any) -> HearthError:
    """The exception for a botocore ``ClientError``."""
    err = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    body = json.dumps({k: v for k, v in e.response.items() if k not in ("Error", "ResponseMetadata")}).encode()
    out = from_response(status, err.get("Code"), body)
    out.message = err.get("Message") or out.message
    out.args = (out.message,)
    return out
