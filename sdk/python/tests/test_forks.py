"""Forks through the SDK (`POST /hearth/v1/microvms/{id}/fork`): the fork starts from
the source's memory, processes and files at one instant; both then run on independently;
the fork has its own id, endpoint, hostname, machine-id and random bytes. A fork of a fork
outlives the fork it came from (suspended and resumed after that one is gone)."""

import time

import pytest

import hearth
from hearth import Sandbox


def identity(s: Sandbox):
    out = s.run("cat /proc/sys/kernel/hostname /etc/machine-id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout
    host, machine, rand = out.split("\n")[:3]
    return host, machine, rand


def counter(s: Sandbox) -> int:
    return int(s.files.read_text("/tmp/counter").strip())


def rising(s: Sandbox) -> bool:
    """The counting process runs in `s`: its count goes up."""
    first = counter(s)
    deadline = time.time() + 30
    while time.time() < deadline:
        time.sleep(0.5)
        if counter(s) > first:
            return True
    return False


def test_a_fork_copies_the_running_state_and_both_run_on(client, image):
    with Sandbox.create(image=image, client=client) as src:
        src.files.write("/workspace/shared.txt", "before the fork\n")
        job = src.run("i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.tmp; mv /tmp/counter.tmp /tmp/counter; sleep 0.2; done", background=True)
        deadline = time.time() + 30
        while not src.files.exists("/tmp/counter"):
            assert time.time() < deadline
            time.sleep(0.2)
        with src.fork() as fk:
            assert fk.id != src.id and fk.endpoint != src.endpoint
            assert fk.info["state"] == "RUNNING" and src.state == "RUNNING"
            assert fk.info["imageArn"] == src.info["imageArn"]
            # Files and processes came along, and the process runs on in both.
            assert fk.files.read_text("/workspace/shared.txt") == "before the fork\n"
            assert fk.run(["kill", "-0", str(job.pid)]).ok
            assert rising(fk) and rising(src)
            # From here on each has its own disk.
            src.files.write("/workspace/only-source", "s")
            fk.files.write("/workspace/only-fork", "f")
            assert not fk.files.exists("/workspace/only-source")
            assert not src.files.exists("/workspace/only-fork")
            # Fresh identity and random state.
            (h1, m1, r1), (h2, m2, r2) = identity(src), identity(fk)
            assert h1 != h2 and m1 != m2, (h1, h2, m1, m2)
            assert r1 != r2 and len(r1) == 64
            # A fork of the fork outlives it: its disk does not lean on the middle one's.
            grand = fk.fork()
            fk.terminate()
            try:
                assert grand.files.read_text("/workspace/only-fork") == "f"
                grand.suspend()
                grand.resume()
                assert grand.files.read_text("/workspace/only-fork") == "f"
                assert grand.run("cat /workspace/shared.txt").stdout == "before the fork\n"
            finally:
                grand.terminate()
        assert Sandbox.connect(fk.id, client=client).info["state"] == "TERMINATED"
        assert src.state == "RUNNING"
        job.kill()
    # Only a running sandbox can be forked.
    with pytest.raises(hearth.ConflictError) as e:
        src.fork()
    assert "RUNNING" in e.value.message


def test_a_fork_retried_with_its_client_token_is_the_same_fork(client, sb):
    path = f"/hearth/v1/microvms/{sb.id}/fork"
    first = client.json("POST", path, {"clientToken": "same-fork"}, timeout=600)
    try:
        again = client.json("POST", path, {"clientToken": "same-fork"}, timeout=600)
        assert again["microvmId"] == first["microvmId"]
        with pytest.raises(hearth.ValidationError):
            client.json("POST", path, {"nonsense": 1})
    finally:
        Sandbox(first["microvmId"], client).terminate()


def test_another_accounts_or_a_made_up_sandbox_cannot_be_forked(client, sb):
    import json
    import os

    import boto3

    other = json.loads(os.environ["HEARTH_KEY_B"])
    b = hearth.Client(
        client.url,
        session=boto3.session.Session(aws_access_key_id=other["accessKeyId"], aws_secret_access_key=other["secretAccessKey"]),
    )
    for who, target in ((b, sb.id), (client, "mvm-0000000000000000"), (client, "..%2F..%2Fetc")):
        with pytest.raises(hearth.NotFoundError):
            who.json("POST", f"/hearth/v1/microvms/{target}/fork", {})
    # Nothing was made for them.
    assert [m["microvmId"] for m in b.call("list_microvms")["items"]] == []
