"""The SDK against a real daemon: create, commands (output, exit codes, streaming,
background), files (read, write, list, upload and download with hashes), suspend and
resume, a port reached through its URL and token, the context manager's clean-up, the
asyncio variant and typed errors."""

import asyncio
import hashlib
import os
import time

import pytest
import urllib3

import hearth
from hearth import Sandbox
from hearth.aio import AsyncSandbox


def test_create_gives_a_running_sandbox(sb: Sandbox):
    assert sb.id.startswith("mvm-")
    assert sb.state == "RUNNING"
    assert sb.endpoint.startswith(sb.id + ".")


def test_run_returns_output_and_exit_code(sb: Sandbox):
    r = sb.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False)
    r = sb.run(["sh", "-c", 'echo "$GREETING from $(pwd)"'], cwd="/tmp", env={"GREETING": "hi there"})
    assert (r.exit_code, r.stdout) == (0, "hi there from /tmp\n")
    assert sb.run("cat", stdin="fed\n").stdout == "fed\n"
    with pytest.raises(hearth.CommandError) as e:
        sb.run("echo nope >&2; exit 4", check=True)
    assert e.value.result.exit_code == 4 and "nope" in str(e.value)


def test_a_timeout_kills_the_command(sb: Sandbox):
    started = time.monotonic()
    r = sb.run("sleep 30; echo never", timeout=2)
    assert not r.ok and "never" not in r.stdout, r
    assert time.monotonic() - started < 25


def test_streaming_calls_back_as_output_comes(sb: Sandbox):
    out, err = [], []
    r = sb.run(
        "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo problem >&2; exit 5",
        on_stdout=out.append, on_stderr=err.append,
    )
    assert "".join(out) == "line1\nline2\nline3\n" == r.stdout
    assert len(out) >= 2, f"the output came in one piece, not as it was written: {out}"
    assert "".join(err) == "problem\n" == r.stderr
    assert r.exit_code == 5


def test_background_commands_run_on_and_are_waited_for_or_killed(sb: Sandbox):
    job = sb.run("echo started; sleep 1; echo finished; echo oops >&2; exit 7", background=True)
    assert job.pid > 1
    r = job.wait(timeout=60)
    assert (r.exit_code, r.stdout, r.stderr) == (7, "started\nfinished\n", "oops\n")
    assert job.exit_code() == 7 and not job.is_running()

    forever = sb.run("echo up; while true; do sleep 1; done", background=True)
    deadline = time.time() + 30
    while forever.stdout() != "up\n":
        assert time.time() < deadline, forever.stdout()
        time.sleep(0.2)
    assert forever.is_running() and forever.exit_code() is None
    forever.kill()
    deadline = time.time() + 30
    while forever.is_running():
        assert time.time() < deadline, "the killed command still runs"
        time.sleep(0.2)
    # The whole group went: no `sleep` of it is left.
    assert sb.run(f"ps -o pid,pgid 2>/dev/null | awk '$2 == {forever.pid}' | wc -l").stdout.strip() in ("0", "")


def test_files_round_trip_with_hashes(sb: Sandbox, tmp_path):
    assert sb.files.write("/workspace/hello.txt", "hello, sandbox\n") == 15
    assert sb.files.read_text("/workspace/hello.txt") == "hello, sandbox\n"
    sb.files.mkdir("/workspace/sub/dir")
    names = {f.name: f for f in sb.files.list("/workspace")}
    assert names["hello.txt"].kind == "file" and names["hello.txt"].size == 15
    assert names["sub"].is_dir

    # A few MiB of random bytes up and back, compared by hash on both sides.
    blob = os.urandom(3 * 1024 * 1024 + 17)
    local = tmp_path / "blob.bin"
    local.write_bytes(blob)
    seen = []
    assert sb.files.upload(local, "/workspace/sub/dir/blob.bin", progress=lambda done, total: seen.append((done, total))) == len(blob)
    assert seen and seen[-1] == (len(blob), len(blob))
    digest = hashlib.sha256(blob).hexdigest()
    assert sb.run("sha256sum /workspace/sub/dir/blob.bin").stdout.split()[0] == digest
    back = tmp_path / "back.bin"
    assert sb.files.download("/workspace/sub/dir/blob.bin", back) == len(blob)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "back.bin.part").exists()

    assert sb.files.exists("/workspace/hello.txt")
    sb.files.remove("/workspace/sub", recursive=True)
    assert not sb.files.exists("/workspace/sub")


def test_url_reaches_a_server_in_the_sandbox(sb: Sandbox):
    sb.files.mkdir("/tmp/www")
    sb.files.write("/tmp/www/index.html", "served from the sandbox\n")
    server = sb.run("exec busybox httpd -f -p 8000 -h /tmp/www", background=True)
    try:
        u = sb.url(8000)
        assert u.url == f"https://{sb.endpoint}" and u.port == 8000 and u.headers["X-aws-proxy-auth"] == u.token
        http = urllib3.PoolManager()
        deadline = time.time() + 60
        while True:
            r = http.request("GET", u.path_url + "/index.html", headers=u.headers, timeout=30)
            if r.status == 200:
                break
            assert time.time() < deadline, (r.status, r.data)
            time.sleep(0.5)
        assert r.data == b"served from the sandbox\n"
        # A link a browser can open: the sandbox's own host, traded there for a cookie.
        link = sb.link(8000, minutes=5)
        assert link.startswith(f"https://{sb.endpoint}/?hearth-link="), link
        # Without the token: refused.
        assert http.request("GET", u.path_url + "/index.html", headers={"X-aws-proxy-port": "8000"}, timeout=30).status in (401, 403)
    finally:
        server.kill()


def test_errors_are_typed_with_the_daemons_message(client, sb: Sandbox):
    with pytest.raises(hearth.NotFoundError) as e:
        Sandbox.connect("mvm-0000000000000000", client=client)
    assert e.value.code == "ResourceNotFoundException" and e.value.status == 404 and "mvm-0000000000000000" in e.value.message
    with pytest.raises(hearth.NotFoundError):
        Sandbox.create(image="no-such-image", client=client)
    with pytest.raises(hearth.HearthError) as e:
        sb.files.read("/no/such/file")
    assert e.value.status in (400, 404) and e.value.message
    with pytest.raises(hearth.ValidationError):
        sb.url(0)
    bad = hearth.Client(client.url, session=__import__("boto3").session.Session(aws_access_key_id="AKIANOSUCHKEY0000000", aws_secret_access_key="x" * 40))
    with pytest.raises(hearth.AuthError):
        Sandbox.connect(sb.id, client=bad)
    with pytest.raises(hearth.AuthError):
        bad.json("POST", f"/hearth/v1/microvms/{sb.id}/exec", {"shell": "true"})


def test_async_variant(sb: Sandbox):
    async def main():
        a = await AsyncSandbox.connect(sb.id, client=sb.client)
        results = await asyncio.gather(*(a.run(f"echo {i}") for i in range(3)))
        assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
        await a.files.write("/tmp/async.txt", b"async bytes")
        assert await a.files.read("/tmp/async.txt") == b"async bytes"
        assert "async.txt" in [f.name for f in await a.files.list("/tmp")]
        job = await a.run_background("echo bg; exit 2")
        r = await asyncio.to_thread(job.wait, 60)
        assert (r.exit_code, r.stdout) == (2, "bg\n")
        assert (await a.refresh())["state"] == "RUNNING"
        async with a:  # connected sandboxes are kept by default
            pass
        assert (await a.refresh())["state"] == "RUNNING"

    asyncio.run(main())


def test_suspend_resume_and_the_context_manager_terminates(client, image):
    with Sandbox.create(image=image, client=client) as s:
        s.files.write("/workspace/kept.txt", "across a suspend\n")
        s.suspend()
        assert s.state == "SUSPENDED"
        s.resume()
        assert s.state == "RUNNING"
        assert s.files.read_text("/workspace/kept.txt") == "across a suspend\n"
        mid = s.id
    assert Sandbox.connect(mid, client=client).info["state"] == "TERMINATED"
    # keep=True leaves it running; terminate() ends it.
    with Sandbox.create(image=image, client=client, keep=True) as k:
        pass
    assert k.state == "RUNNING"
    k.terminate()
    assert k.state in ("TERMINATING", "TERMINATED")
