"""Every Lambda MicroVMs answer the test suites receive, checked against the service model.

Importing this module registers a botocore hook (`before-parse`, which sees the raw body
before botocore's parser drops what it does not know) on boto3's default session, so every
client a test script makes with `boto3.client(...)` is checked; `watch(client)` adds it to
a client made otherwise. A success's body must be its operation's output shape exactly:
no member the shape lacks, every required member, each value of its type (timestamps as
epoch seconds, rest-json's form), strings in their enums and lengths, integers in their
ranges (32-bit for `integer`). An error must carry its code (`x-amzn-ErrorType`) and a JSON
`message`, and an error the model defines only the members of its shape.

Drift raises `ModelDrift` in the call that received it and is remembered: a script that
caught it anyway still exits non-zero, with every drift listed.
"""
import atexit
import json
import os
import sys

import boto3

CHECKED = {"answers": 0}
DRIFT = []


class ModelDrift(AssertionError):
    """An answer outside the service model."""


def _check(shape, value, at, problems):
    kind = shape.type_name
    if value is None:
        problems.append(f"{at}: null")
        return
    if kind == "structure":
        if not isinstance(value, dict):
            problems.append(f"{at}: not an object: {value!r}")
            return
        for k in value:
            if k not in shape.members:
                problems.append(f"{at}: member {k!r} is not in {shape.name}")
        for r in shape.required_members:
            if r not in value:
                problems.append(f"{at}: required member {r!r} of {shape.name} is missing")
        for k, v in value.items():
            if k in shape.members:
                _check(shape.members[k], v, f"{at}.{k}", problems)
    elif kind == "list":
        if not isinstance(value, list):
            problems.append(f"{at}: not a list: {value!r}")
            return
        _bounds(shape, len(value), at, problems)
        for i, v in enumerate(value):
            _check(shape.member, v, f"{at}[{i}]", problems)
    elif kind == "map":
        if not isinstance(value, dict):
            problems.append(f"{at}: not a map: {value!r}")
            return
        _bounds(shape, len(value), at, problems)
        for k, v in value.items():
            _check(shape.key, k, f"{at} key {k!r}", problems)
            _check(shape.value, v, f"{at}.{k}", problems)
    elif kind == "string":
        if not isinstance(value, str):
            problems.append(f"{at}: not a string: {value!r}")
            return
        if shape.enum and value not in shape.enum:
            problems.append(f"{at}: {value!r} is not one of {shape.enum} ({shape.name})")
        _bounds(shape, len(value), at, problems)
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{at}: not an integer: {value!r}")
            return
        lo, hi = (-(2**31), 2**31 - 1) if kind == "integer" else (-(2**63), 2**63 - 1)
        if not lo <= value <= hi:
            problems.append(f"{at}: {value} is outside the {kind} range")
        _bounds(shape, value, at, problems)
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.append(f"{at}: not a boolean: {value!r}")
    elif kind in ("timestamp", "double", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{at}: not a number (rest-json timestamps are epoch seconds): {value!r}")
    elif kind == "blob":
        if not isinstance(value, str):
            problems.append(f"{at}: not a base64 string: {value!r}")


def _bounds(shape, n, at, problems):
    lo, hi = shape.metadata.get("min"), shape.metadata.get("max")
    if lo is not None and n < lo:
        problems.append(f"{at}: {n} is below the minimum {lo} of {shape.name}")
    if hi is not None and n > hi:
        problems.append(f"{at}: {n} is above the maximum {hi} of {shape.name}")


def problems_of(operation_model, status, headers, body):
    """What an answer to `operation_model` (status, headers, raw body) has outside the model."""
    problems = []
    headers = {k.lower(): v for k, v in headers.items()}
    if status >= 300:
        code = headers.get("x-amzn-errortype", "").split(":")[0]
        if not code:
            return [f"a {status} answer without x-amzn-ErrorType"]
        try:
            doc = json.loads(body or b"null")
        except ValueError:
            return [f"{code}: the body is not JSON: {body[:200]!r}"]
        if not isinstance(doc, dict) or not isinstance(doc.get("message"), str):
            return [f"{code}: no JSON message: {body[:200]!r}"]
        shape = next((e for e in operation_model.service_model.error_shapes if e.name == code), None)
        if shape is not None:
            _check(shape, doc, code, problems)
        return problems
    out = operation_model.output_shape
    if out is None or not out.members:
        if body and json.loads(body) not in ({}, None):
            problems.append(f"{operation_model.name} has no output, but answered {body[:200]!r}")
        return problems
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return [f"{operation_model.name}: the body is not JSON: {body[:200]!r}"]
    _check(out, doc, out.name, problems)
    return problems


def _before_parse(operation_model, response_dict, **_):
    CHECKED["answers"] += 1
    problems = problems_of(operation_model, response_dict["status_code"], response_dict["headers"], response_dict["body"])
    if problems:
        DRIFT.append((operation_model.name, problems))
        raise ModelDrift(f"{operation_model.name} answered outside the model: " + "; ".join(problems))


def watch(client):
    """Checks every answer `client` receives; returns it."""
    client.meta.events.register("before-parse.lambda-microvms.*", _before_parse, unique_id="hearth-modelcheck")
    return client


def install():
    """Checks every answer of clients later made with `boto3.client(...)`."""
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register("before-parse.lambda-microvms.*", _before_parse, unique_id="hearth-modelcheck")


def _report():
    if DRIFT:
        sys.stderr.write(f"modelcheck: {len(DRIFT)} answers outside the service model:\n")
        for op, problems in DRIFT:
            sys.stderr.write(f"  {op}: {'; '.join(problems)}\n")
        sys.stderr.flush()
        os._exit(3)
    sys.stderr.write(f"modelcheck: {CHECKED['answers']} answers checked against the service model\n")


install()
atexit.register(_report)
