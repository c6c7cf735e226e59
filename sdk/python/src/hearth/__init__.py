"""Hearth's Python SDK: sandboxes (Hearth microvms) for agents and programs.

    from hearth import Sandbox

    with Sandbox.create(image="my-image") as sb:
        r = sb.run("python3 -c 'print(6 * 7)'")
        assert r.stdout == "42\\n"
        sb.files.write("/workspace/notes.txt", "hello")

Configuration comes from the environment: ``HEARTH_URL`` (or
``AWS_ENDPOINT_URL_LAMBDA_MICROVMS``) and AWS credentials (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` from ``hearth keys create``, or a profile), or from a
:class:`Client` passed as ``client=``. The asyncio variant is :mod:`hearth.aio`.
"""

from .client import Client
from .errors import (
    AuthError,
    CapacityError,
    CommandError,
    ConfigurationError,
    ConflictError,
    HearthError,
    NotFoundError,
    QuotaExceededError,
    SandboxError,
    ServerError,
    ThrottlingError,
    ValidationError,
)
from .files import FileInfo, Files
from .sandbox import BackgroundCommand, CommandResult, Sandbox, SandboxUrl

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BackgroundCommand",
    "CapacityError",
    "Client",
    "CommandError",
    "CommandResult",
    "ConfigurationError",
    "ConflictError",
    "FileInfo",
    "Files",
    "HearthError",
    "NotFoundError",
    "QuotaExceededError",
    "Sandbox",
    "SandboxError",
    "SandboxUrl",
    "ServerError",
    "ThrottlingError",
    "ValidationError",
]
