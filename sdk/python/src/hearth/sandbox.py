"""A sandbox: one Hearth microvm, its commands, files, endpoint and lifecycle."""

from __future__ import annotations

import json
import shlex
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Union, overload

from . import errors
from .client import Client, iter_lines
from .files import Files

#: A command: one shell line (run by ``sh -c``), or a program and its arguments.
Command = Union[str, Sequence[str]]

#: Called with each piece of output as it arrives (decoded UTF-8; not split on lines).
OutputCallback = Callable[[str], None]

#: Where background commands keep their output and exit status in the guest.
BACKGROUND_DIR = "/tmp/.hearth-bg"


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left."""

    #: Its exit status (128 + N when killed by signal N; -1 when unknown).
    exit_code: int
    stdout: str
    stderr: str
    #: The signal that ended it, if one did.
    signal: Optional[int] = None

    @property
    def ok(self) -> bool:
        """True when it exited 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class SandboxUrl:
    """How to reach a port of the sandbox over HTTP(S): the endpoint and a token that
    opens it (``CreateMicrovmAuthToken``), to send as the ``X-aws-proxy-auth`` header.

    A browser cannot set that header: :meth:`Sandbox.link` gives a URL with a short-lived
    token in it that the daemon exchanges for a cookie of the sandbox's own host."""

    #: ``https://<endpoint>``: the sandbox's own host (needs the daemon's endpoint domain
    #: and TLS listener to resolve and answer).
    url: str
    #: The same endpoint by path on the daemon's own URL (``<daemon>/microvms/<id>``),
    #: which works wherever the daemon does.
    path_url: str
    #: The port the token opens.
    port: int
    #: The token (``X-aws-proxy-auth``).
    token: str
    #: Headers to send: the token, and the port (``X-aws-proxy-port``).
    headers: Dict[str, str] = field(default_factory=dict)


class Sandbox:
    """One microvm. Make one with :meth:`create` or :meth:`connect`.

    Used as a context manager it is terminated on exit, unless ``keep=True`` was given
    (or :attr:`keep` set)::

        with Sandbox.create(image="my-image") as sb:
            print(sb.run("uname -a").stdout)
    """

    def __init__(self, microvm_id: str, client: Client, info: Optional[Dict[str, Any]] = None, keep: bool = False) -> None:
        #: The microvm id (``mvm-...``).
        self.id = microvm_id
        #: The connection it uses.
        self.client = client
        #: Leave the sandbox running when the ``with`` block ends.
        self.keep = keep
        self._info: Dict[str, Any] = dict(info or {})
        #: Its files: ``sandbox.files.read(...)``, ``write``, ``list``, ``upload``, ``download``.
        self.files = Files(self)

    # -- making one ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        image: str,
        *,
        version: Optional[str] = None,
        idle: Union[None, int, Mapping[str, Any]] = None,
        egress: Union[None, bool, Sequence[str]] = None,
        max_duration: Optional[int] = None,
        execution_role: Optional[str] = None,
        run_hook_payload: Optional[str] = None,
        client: Optional[Client] = None,
        keep: bool = False,
        wait_timeout: float = 300.0,
    ) -> "Sandbox":
        """Starts a sandbox of image ``image`` (a name or ARN; ``version``, else its newest
        built one) and waits until it is RUNNING.

        ``idle`` is the idle policy: seconds of idleness before it is suspended (then
        resumed automatically on the next command), or a full ``IdlePolicy`` mapping
        (``maxIdleDurationSeconds``, ``suspendedDurationSeconds``, ``autoResumeEnabled``).
        ``egress``: ``True`` for the internet, ``False`` for none, or a list of egress
        connector ARNs; ``None`` takes the image's (else the daemon's default).
        ``max_duration``: seconds it may live (at most 8 hours).

        Raises :class:`hearth.errors.SandboxError` when it did not start.
        """
        client = client or Client()
        params: Dict[str, Any] = {"imageIdentifier": image, "clientToken": str(uuid.uuid4())}
        if version is not None:
            params["imageVersion"] = str(version)
        if idle is not None:
            params["idlePolicy"] = (
                {"maxIdleDurationSeconds": int(idle), "suspendedDurationSeconds": 86400, "autoResumeEnabled": True}
                if isinstance(idle, int)
                else dict(idle)
            )
        if egress is True:
            params["egressNetworkConnectors"] = ["INTERNET_EGRESS"]
        elif egress is False:
            params["egressNetworkConnectors"] = []
        elif egress is not None:
            params["egressNetworkConnectors"] = list(egress)
        if max_duration is not None:
            params["maximumDurationInSeconds"] = int(max_duration)
        if execution_role is not None:
            params["executionRoleArn"] = execution_role
        if run_hook_payload is not None:
            params["runHookPayload"] = run_hook_payload
        info = client.call("run_microvm", **params)
        sb = cls(info["microvmId"], client, info, keep=keep)
        sb.wait_until("RUNNING", timeout=wait_timeout)
        return sb

    @classmethod
    def connect(cls, microvm_id: str, *, client: Optional[Client] = None, keep: bool = True) -> "Sandbox":
        """The existing sandbox ``microvm_id`` (checked to exist). Not terminated by a
        ``with`` block unless ``keep=False``."""
        sb = cls(microvm_id, client or Client(), keep=keep)
        sb.refresh()
        return sb

    # -- state ---------------------------------------------------------------------------

    def refresh(self) -> Dict[str, Any]:
        """Reads the sandbox's record again (GetMicrovm) and returns it."""
        self._info = self.client.call("get_microvm", microvmIdentifier=self.id)
        return dict(self._info)

    @property
    def info(self) -> Dict[str, Any]:
        """The record as last read (GetMicrovm's shape)."""
        return dict(self._info)

    @property
    def state(self) -> str:
        """PENDING, RUNNING, SUSPENDING, SUSPENDED, TERMINATING or TERMINATED (read now)."""
        return str(self.refresh()["state"])

    @property
    def endpoint(self) -> str:
        """Its endpoint host (``<id>.<domain>``)."""
        if "endpoint" not in self._info:
            self.refresh()
        return str(self._info.get("endpoint", ""))

    def wait_until(self, state: str, timeout: float = 300.0) -> None:
        """Waits until the sandbox is in ``state``; raises :class:`SandboxError` if it
        ends (TERMINATED) first, or on timeout."""
        deadline = time.monotonic() + timeout
        info = self._info if self._info.get("state") else self.refresh()
        while True:
            if info.get("state") == state:
                return
            if info.get("state") == "TERMINATED":
                raise errors.SandboxError(f"sandbox {self.id} is TERMINATED: {info.get('stateReason', 'no reason given')}", code="TERMINATED")
            if time.monotonic() > deadline:
                raise errors.SandboxError(f"sandbox {self.id} is still {info.get('state')} after {timeout:.0f} s (waiting for {state})")
            time.sleep(0.5)
            info = self.refresh()

    # -- commands ------------------------------------------------------------------------

    def _exec_body(self, cmd: Command, cwd: Optional[str], env: Optional[Mapping[str, str]], timeout: Optional[float], user: Optional[str]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"shell": cmd} if isinstance(cmd, str) else {"command": list(cmd)}
        if cwd is not None:
            body["cwd"] = cwd
        if env:
            body["env"] = dict(env)
        if timeout is not None:
            body["timeoutSeconds"] = float(timeout)
        if user is not None:
            body["user"] = user
        return body

    @overload
    def run(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = ...,
        env: Optional[Mapping[str, str]] = ...,
        timeout: Optional[float] = ...,
        on_stdout: Optional[OutputCallback] = ...,
        on_stderr: Optional[OutputCallback] = ...,
        background: Literal[False] = ...,
        user: Optional[str] = ...,
        stdin: Optional[str] = ...,
        check: bool = ...,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = ...,
        env: Optional[Mapping[str, str]] = ...,
        timeout: Optional[float] = ...,
        on_stdout: Optional[OutputCallback] = ...,
        on_stderr: Optional[OutputCallback] = ...,
        background: Literal[True],
        user: Optional[str] = ...,
        stdin: Optional[str] = ...,
        check: bool = ...,
    ) -> "BackgroundCommand": ...

    def run(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        background: bool = False,
        user: Optional[str] = None,
        stdin: Optional[str] = None,
        check: bool = False,
    ) -> Union[CommandResult, "BackgroundCommand"]:
        """Runs ``cmd`` in the sandbox: a string runs with ``sh -c``; a list is the program
        and its arguments. ``cwd``, ``env`` and ``user`` default to the image's
        (``WORKDIR``, ``ENV``, ``USER``); ``timeout`` seconds kills it (its whole process
        group) when over. A SUSPENDED sandbox whose idle policy allows is resumed first.

        Returns a :class:`CommandResult` once it ends. With ``on_stdout``/``on_stderr`` the
        output is streamed to them as it comes (and also collected). With ``background``
        it returns at once a :class:`BackgroundCommand` whose output is kept in the guest
        (read it later, wait for it, kill it). With ``check`` a non-zero exit raises
        :class:`hearth.errors.CommandError`.
        """
        if background:
            return self._background(cmd, cwd, env, user)
        body = self._exec_body(cmd, cwd, env, timeout, user)
        if stdin is not None:
            body["stdin"] = stdin
        http_timeout = None if timeout is None else timeout + 60
        path = f"/hearth/v1/microvms/{self.id}/exec"
        if on_stdout is None and on_stderr is None:
            out = self.client.json("POST", path, body, timeout=http_timeout or 3600)
            result = CommandResult(_exit_code(out.get("exitCode"), out.get("signal")), out.get("stdout", ""), out.get("stderr", ""), out.get("signal"))
        else:
            result = self._stream(path, body, on_stdout, on_stderr, http_timeout or 3600)
        if check and not result.ok:
            raise errors.CommandError(f"{cmd!r} exited {result.exit_code}: {result.stderr.strip()[-500:]}", result)
        return result

    def _stream(self, path: str, body: Dict[str, Any], on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback], timeout: float) -> CommandResult:
        r = self.client.request(
            "POST", path, query={"stream": "true"}, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, stream=True, timeout=timeout
        )
        out: List[str] = []
        err: List[str] = []
        code, signal = -1, None
        try:
            for line in iter_lines(r):
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "stdout" in msg:
                    out.append(msg["stdout"])
                    if on_stdout:
                        on_stdout(msg["stdout"])
                elif "stderr" in msg:
                    err.append(msg["stderr"])
                    if on_stderr:
                        on_stderr(msg["stderr"])
                elif "exit" in msg:
                    x = msg["exit"] or {}
                    signal = x.get("signal")
                    code = _exit_code(x.get("code"), signal)
                elif "error" in msg:
                    raise errors.HearthError(f"the command failed in the sandbox: {msg['error']}", code="ExecError")
        finally:
            r.release_conn()
        return CommandResult(code, "".join(out), "".join(err), signal)

    def _background(self, cmd: Command, cwd: Optional[str], env: Optional[Mapping[str, str]], user: Optional[str]) -> "BackgroundCommand":
        handle = uuid.uuid4().hex[:12]
        d = f"{BACKGROUND_DIR}/{handle}"
        line = cmd if isinstance(cmd, str) else shlex.join(cmd)
        # Its own session (setsid, where the image has it), so that it outlives this exec
        # and a kill reaches its whole process group; its status is written when it ends.
        script = (
            'd="$1"; mkdir -p "$d" || exit 1; '
            'w=\'sh -c "$1"; echo $? > "$0/exit.tmp"; mv "$0/exit.tmp" "$0/exit"\'; '
            'if command -v setsid >/dev/null 2>&1; then setsid sh -c "$w" "$d" "$2" </dev/null >"$d/stdout" 2>"$d/stderr" & '
            'else nohup sh -c "$w" "$d" "$2" </dev/null >"$d/stdout" 2>"$d/stderr" & fi; '
            'echo $! > "$d/pid"; echo $!'
        )
        r = self.run(["sh", "-c", script, "hearth-bg", d, line], cwd=cwd, env=env, user=user, timeout=60)
        if not r.ok or not r.stdout.strip().isdigit():
            raise errors.HearthError(f"could not start {line!r} in the background: {r.stderr.strip() or r.stdout.strip()}")
        return BackgroundCommand(self, handle, int(r.stdout.strip()), line)

    # -- lifecycle -----------------------------------------------------------------------

    def suspend(self) -> None:
        """Suspends the sandbox (its memory and disk saved; no CPU or RAM held)."""
        self.client.call("suspend_microvm", microvmIdentifier=self.id)
        self.refresh()

    def resume(self) -> None:
        """Resumes a suspended sandbox, where it left off."""
        self.client.call("resume_microvm", microvmIdentifier=self.id)
        self.wait_until("RUNNING")

    def fork(self, *, keep: Optional[bool] = None) -> "Sandbox":
        """A copy of this running sandbox: a new sandbox with the same memory, processes
        and files at this instant, its own id, endpoint, network and identity, and fresh
        random state. Both run on independently (``POST /hearth/v1/microvms/{id}/fork``)."""
        out = self.client.json("POST", f"/hearth/v1/microvms/{self.id}/fork", {"clientToken": str(uuid.uuid4())}, timeout=600)
        sb = Sandbox(out["microvmId"], self.client, out, keep=self.keep if keep is None else keep)
        sb.wait_until("RUNNING")
        return sb

    def terminate(self) -> None:
        """Ends the sandbox and deletes everything it held (nothing to do when it has
        ended already)."""
        try:
            self.client.call("terminate_microvm", microvmIdentifier=self.id)
        except errors.ConflictError:
            if self.refresh().get("state") != "TERMINATED":
                raise
        self._info["state"] = "TERMINATED"

    # -- reaching it ---------------------------------------------------------------------

    def url(self, port: int = 8080, minutes: int = 60) -> SandboxUrl:
        """The endpoint of ``port`` with a token valid ``minutes`` (CreateMicrovmAuthToken).
        Send :attr:`SandboxUrl.headers` with each request."""
        out = self.client.call(
            "create_microvm_auth_token", microvmIdentifier=self.id, expirationInMinutes=minutes, allowedPorts=[{"port": port}]
        )
        token = out["authToken"]["X-aws-proxy-auth"]
        return SandboxUrl(
            url=f"https://{self.endpoint}",
            path_url=f"{self.client.url}/microvms/{self.id}",
            port=port,
            token=token,
            headers={"X-aws-proxy-auth": token, "X-aws-proxy-port": str(port)},
        )

    def link(self, port: int = 8080, minutes: int = 60) -> str:
        """A URL a browser can open (``POST /hearth/v1/microvms/{id}/link``; ``hearth url``):
        a token valid for 5 minutes in the URL, which the sandbox's own host exchanges for
        an HttpOnly cookie of that host lasting ``minutes`` and opening ``port``. Share it
        like a password until it is used."""
        out = self.client.json("POST", f"/hearth/v1/microvms/{self.id}/link", {"port": port, "expirationInMinutes": minutes})
        return str(out["url"])

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.keep:
            try:
                self.terminate()
            except errors.NotFoundError:
                pass

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, state={self._info.get('state')!r})"


def _exit_code(code: Optional[int], signal: Optional[int]) -> int:
    """The shell's convention: the status, else 128 + the signal that ended it, else -1."""
    if code is not None:
        return int(code)
    return 128 + int(signal) if signal else -1


class BackgroundCommand:
    """A command started with ``run(..., background=True)``: it runs on in the guest, its
    output kept in files there (``/tmp/.hearth-bg/<id>/stdout``, ``stderr``, ``exit``)."""

    def __init__(self, sandbox: Sandbox, handle: str, pid: int, command: str) -> None:
        self.sandbox = sandbox
        #: Its handle (the name of its directory in the guest).
        self.id = handle
        #: Its process id in the guest (also its process group's).
        self.pid = pid
        #: The shell line it runs.
        self.command = command
        self.dir = f"{BACKGROUND_DIR}/{handle}"

    def stdout(self) -> str:
        """Its output so far."""
        return self.sandbox.files.read(f"{self.dir}/stdout").decode("utf-8", "replace")

    def stderr(self) -> str:
        """Its error output so far."""
        return self.sandbox.files.read(f"{self.dir}/stderr").decode("utf-8", "replace")

    def exit_code(self) -> Optional[int]:
        """Its exit status once it has ended by itself; ``None`` while it runs (or when it
        was killed before it could record one)."""
        r = self.sandbox.run(["cat", f"{self.dir}/exit"])
        return int(r.stdout.strip()) if r.ok and r.stdout.strip().lstrip("-").isdigit() else None

    def is_running(self) -> bool:
        """Whether its process is still alive."""
        return self.sandbox.run(["kill", "-0", str(self.pid)]).ok and self.exit_code() is None

    def wait(self, timeout: Optional[float] = None, poll: float = 0.5) -> CommandResult:
        """Waits for it to end; its result. Raises ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # The exit file is read again once the process is gone: it may have written
            # it and ended between the first read and the check.
            r = self.sandbox.run(
                f"cat {self.dir}/exit 2>/dev/null || {{ kill -0 {self.pid} 2>/dev/null && echo running || cat {self.dir}/exit 2>/dev/null; }}"
            )
            s = r.stdout.strip()
            if s != "running":
                code = int(s) if s.lstrip("-").isdigit() else -1
                return CommandResult(code, self.stdout(), self.stderr())
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.command!r} still runs after {timeout} s")
            time.sleep(poll)

    def kill(self, signal: str = "KILL") -> None:
        """Sends ``signal`` (a name: TERM, KILL, INT...) to its whole process group."""
        self.sandbox.run(f"kill -{signal} -{self.pid} 2>/dev/null || kill -{signal} {self.pid} 2>/dev/null; true")

    def __repr__(self) -> str:
        return f"BackgroundCommand({self.id!r}, pid={self.pid}, command={self.command!r})"
