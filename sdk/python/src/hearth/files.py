"""Files in a sandbox, through the files extension (``/hearth/v1/microvms/{id}/files``):
reads stream out of the guest, writes stream in (signed with the body's SHA-256, so no
size limit below the daemon's and the guest's), each write atomic in the guest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, List, Optional, Union

if TYPE_CHECKING:
    from .sandbox import Sandbox

#: Called with (bytes done, bytes in all; ``None`` when not known) as a transfer goes.
Progress = Callable[[int, Optional[int]], None]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileInfo:
    """One entry of a directory listing."""

    #: The entry's name (not its full path).
    name: str
    #: ``file``, ``dir``, ``symlink`` or ``other``.
    kind: str
    size: int
    #: Permission bits.
    mode: int
    #: Modification time, seconds since the epoch.
    mtime: int

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"


class Files:
    """``sandbox.files``: read, write, list, upload and download."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sb = sandbox

    def _path(self) -> str:
        return f"/hearth/v1/microvms/{self._sb.id}/files"

    def read(self, path: str) -> bytes:
        """The contents of file ``path`` in the guest (whole, in memory: use
        :meth:`download` for large files)."""
        r = self._sb.client.request("GET", self._path(), query={"path": path}, stream=True)
        try:
            return b"".join(r.stream(_CHUNK))
        finally:
            r.release_conn()

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """File ``path`` decoded as text."""
        return self.read(path).decode(encoding)

    def write(self, path: str, data: Union[bytes, str], encoding: str = "utf-8") -> int:
        """Writes ``data`` to file ``path`` in the guest (replacing it atomically; its
        directory must exist). Returns the size written."""
        raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
        return self._put(path, raw, len(raw), hashlib.sha256(raw).hexdigest())

    def list(self, path: str = "/") -> List[FileInfo]:
        """The entries of directory ``path``, sorted by name."""
        out = self._sb.client.json("GET", self._path() + "/list", query={"path": path})
        entries = []
        for e in out.get("entries", []):
            name = e.get("path")
            if isinstance(name, dict):  # a name that is not UTF-8: base64 of its bytes
                import base64

                name = base64.b64decode(name.get("base64", "")).decode("utf-8", "replace")
            entries.append(FileInfo(str(name), e.get("kind", "other"), int(e.get("size", 0)), int(e.get("mode", 0)), int(e.get("mtime", 0))))
        return entries

    def upload(self, local_path: Union[str, "os.PathLike[str]"], path: str, progress: Optional[Progress] = None) -> int:
        """Copies local file ``local_path`` to ``path`` in the guest, streamed (hashed in one
        pass first, then sent: the daemon checks the hash before the file appears).
        Returns the size written."""
        size = os.path.getsize(local_path)
        h = hashlib.sha256()
        with open(local_path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        with open(local_path, "rb") as f:
            body: BinaryIO = _Counting(f, size, progress) if progress else f  # type: ignore[assignment]
            return self._put(path, body, size, h.hexdigest())

    def download(self, path: str, local_path: Union[str, "os.PathLike[str]"], progress: Optional[Progress] = None) -> int:
        """Copies file ``path`` of the guest to ``local_path``, streamed (written to a
        temporary file beside it, renamed into place when complete). Returns its size."""
        r = self._sb.client.request("GET", self._path(), query={"path": path}, stream=True, timeout=600)
        total = r.headers.get("content-length")
        expected = int(total) if total and total.isdigit() else None
        tmp = f"{os.fspath(local_path)}.part"
        done = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in r.stream(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, expected)
            if expected is not None and done != expected:
                raise OSError(f"download of {path} ended after {done} of {expected} bytes")
            os.replace(tmp, local_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            r.release_conn()
        return done

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the guest."""
        return self._sb.run(["test", "-e", path]).exit_code == 0

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes ``path`` in the guest (a directory with ``recursive``)."""
        self._sb.run(["rm", "-rf" if recursive else "-f", "--", path], check=True)

    def mkdir(self, path: str) -> None:
        """Creates directory ``path`` and its parents in the guest."""
        self._sb.run(["mkdir", "-p", "--", path], check=True)

    def _put(self, path: str, body: Union[bytes, BinaryIO], size: int, sha256: str) -> int:
        r = self._sb.client.request(
            "PUT",
            self._path(),
            query={"path": path},
            body=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            payload_sha256=sha256,
            timeout=600,
        )
        import json

        return int(json.loads(r.data or b"{}").get("size", size))


class _Counting:
    """A file object that reports how much of it has been read."""

    def __init__(self, f: BinaryIO, size: int, progress: Progress) -> None:
        self._f, self._size, self._progress, self._done = f, size, progress, 0

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._done += len(b)
        self._progress(self._done, self._size)
        return b

    def __len__(self) -> int:
        return self._size
