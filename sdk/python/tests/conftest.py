"""Fixtures for the SDK's tests, which run against a real `hearth serve` with real
microvms. `crates/cli/tests/sdk.rs` starts the daemon and runs pytest with:

- ``HEARTH_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``: the daemon and a key;
- ``HEARTH_SDK_CTX``: a build context (a Dockerfile on the ``minimal`` base) that the
  key's account may name as a ``file://`` code artifact.

The image is built once per session; the session ends by turning its warm pool off, so
that no VM outlives the tests (the Rust side checks that none does).
"""

import os
import time

import pytest

from hearth import Client, Sandbox

MINIMAL = "arn:aws-hearth:lambda:hh-local-1:hearth:microvm-image:minimal"
ROLE = "arn:aws:iam::123456789012:role/hearth-build"
IMAGE = "sdk"


@pytest.fixture(scope="session")
def client() -> Client:
    return Client()


@pytest.fixture(scope="session")
def image(client: Client):
    client.call(
        "create_microvm_image",
        name=IMAGE, baseImageArn=MINIMAL, buildRoleArn=ROLE, codeArtifact={"uri": "file://" + os.environ["HEARTH_SDK_CTX"]},
    )
    deadline = time.time() + 600
    while True:
        v = client.call("get_microvm_image_version", imageIdentifier=IMAGE, imageVersion="1")
        if v["state"] in ("SUCCESSFUL", "FAILED"):
            break
        assert time.time() < deadline, "the image build took over 10 minutes"
        time.sleep(0.5)
    assert v["state"] == "SUCCESSFUL", v
    yield IMAGE
    # No warm VM may outlive the session.
    arn = client.call("get_microvm_image", imageIdentifier=IMAGE)["imageArn"]
    client.call("tag_resource", Resource=arn, Tags={"hearth:pool-size": "0"})


@pytest.fixture(scope="module")
def sb(client: Client, image: str):
    """One sandbox for a module's tests, terminated after them."""
    with Sandbox.create(image=image, client=client) as s:
        yield s
