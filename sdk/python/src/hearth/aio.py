"""The asyncio variant: :class:`AsyncSandbox` has the methods of :class:`hearth.Sandbox` as
coroutines.

Each call runs the synchronous SDK in a worker thread (``asyncio.to_thread``), so the
event loop is never blocked and no second HTTP stack is needed; many calls may be in
flight at once (the default thread pool bounds how many run at the same moment).
Streaming callbacks (``on_stdout``/``on_stderr``) are called from that worker thread:
hand their data to the loop with ``loop.call_soon_threadsafe`` if it must get there.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar, Union

from .client import Client
from .files import FileInfo, Progress
from .sandbox import BackgroundCommand, Command, CommandResult, OutputCallback, Sandbox, SandboxUrl


T = TypeVar("T")


async def _call(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await asyncio.to_thread(functools.partial(fn, *args, **kw))


class AsyncFiles:
    """``AsyncSandbox.files``: the coroutine forms of :class:`hearth.files.Files`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._files = sandbox.files

    async def read(self, path: str) -> bytes:
        return await _call(self._files.read, path)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return await _call(self._files.read_text, path, encoding)

    async def write(self, path: str, data: Union[bytes, str]) -> int:
        return await _call(self._files.write, path, data)

    async def list(self, path: str = "/") -> List[FileInfo]:
        return await _call(self._files.list, path)

    async def upload(self, local_path: Union[str, "os.PathLike[str]"], path: str, progress: Optional[Progress] = None) -> int:
        return await _call(self._files.upload, local_path, path, progress)

    async def download(self, path: str, local_path: Union[str, "os.PathLike[str]"], progress: Optional[Progress] = None) -> int:
        return await _call(self._files.download, path, local_path, progress)


class AsyncSandbox:
    """A sandbox for asyncio code::

        async with await AsyncSandbox.create(image="my-image") as sb:
            r = await sb.run("echo hi")
    """

    def __init__(self, sandbox: Sandbox) -> None:
        #: The synchronous sandbox underneath.
        self.sync = sandbox
        self.files = AsyncFiles(sandbox)

    @property
    def id(self) -> str:
        return self.sync.id

    @property
    def info(self) -> Dict[str, Any]:
        return self.sync.info

    @classmethod
    async def create(cls, image: str, **kw: Any) -> "AsyncSandbox":
        """As :meth:`hearth.Sandbox.create`."""
        return cls(await _call(Sandbox.create, image, **kw))

    @classmethod
    async def connect(cls, microvm_id: str, *, client: Optional[Client] = None, keep: bool = True) -> "AsyncSandbox":
        """As :meth:`hearth.Sandbox.connect`."""
        return cls(await _call(Sandbox.connect, microvm_id, client=client, keep=keep))

    async def run(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        user: Optional[str] = None,
        stdin: Optional[str] = None,
        check: bool = False,
    ) -> CommandResult:
        """As :meth:`hearth.Sandbox.run` (to completion)."""
        return await _call(
            self.sync.run, cmd, cwd=cwd, env=env, timeout=timeout, on_stdout=on_stdout, on_stderr=on_stderr, user=user, stdin=stdin, check=check
        )

    async def run_background(
        self, cmd: Command, *, cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None, user: Optional[str] = None
    ) -> BackgroundCommand:
        """As :meth:`hearth.Sandbox.run` with ``background=True`` (the handle's methods are
        synchronous: wrap them in ``asyncio.to_thread`` or poll sparingly)."""
        return await _call(self.sync.run, cmd, cwd=cwd, env=env, user=user, background=True)

    async def refresh(self) -> Dict[str, Any]:
        return await _call(self.sync.refresh)

    async def suspend(self) -> None:
        await _call(self.sync.suspend)

    async def resume(self) -> None:
        await _call(self.sync.resume)

    async def fork(self, *, keep: Optional[bool] = None) -> "AsyncSandbox":
        return AsyncSandbox(await _call(self.sync.fork, keep=keep))

    async def terminate(self) -> None:
        await _call(self.sync.terminate)

    async def url(self, port: int = 8080, minutes: int = 60) -> SandboxUrl:
        return await _call(self.sync.url, port, minutes)

    async def link(self, port: int = 8080, minutes: int = 60) -> str:
        return await _call(self.sync.link, port, minutes)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await _call(self.sync.__exit__, *exc)

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.sync.id!r})"


__all__ = ["AsyncSandbox", "AsyncFiles"]
