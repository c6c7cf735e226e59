"""The connection to a Hearth daemon: the Lambda MicroVMs API through boto3's
``lambda-microvms`` client, and Hearth's extensions (``/hearth/v1/...``: exec, files,
forks, links; see ``GET /hearth/v1/openapi.json``) over urllib3, signed with botocore's
SigV4 (signing name ``lambda``)."""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import boto3
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError

from . import errors

#: The region signed into requests when neither the call, the environment nor the profile
#: names one (the daemon accepts any).
DEFAULT_REGION = "hh-local-1"

#: The hash that signs an empty body.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class Client:
    """A daemon and the credentials to sign for it.

    Arguments default from the environment: ``url`` from ``HEARTH_URL``, else
    ``AWS_ENDPOINT_URL_LAMBDA_MICROVMS``; credentials from the standard AWS chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    the shared files...), or ``profile``; the region from ``AWS_REGION``/the profile,
    else ``hh-local-1``. ``session`` is a ready ``boto3.session.Session`` to use instead.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        profile: Optional[str] = None,
        region: Optional[str] = None,
        session: Optional[boto3.session.Session] = None,
        timeout: float = 120.0,
    ) -> None:
        url = url or os.environ.get("HEARTH_URL") or os.environ.get("AWS_ENDPOINT_URL_LAMBDA_MICROVMS")
        if not url:
            raise errors.ConfigurationError("no daemon URL: pass url= or set HEARTH_URL (or AWS_ENDPOINT_URL_LAMBDA_MICROVMS)")
        #: The daemon's URL, without a trailing slash.
        self.url = url.rstrip("/")
        self.session = session or boto3.session.Session(profile_name=profile)
        #: The region signed into requests.
        self.region = region or self.session.region_name or DEFAULT_REGION
        self._credentials = self.session.get_credentials()
        if self._credentials is None:
            raise errors.ConfigurationError(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (from `hearth keys create`), or a profile"
            )
        #: Seconds a call may take unless it says otherwise.
        self.timeout = timeout
        #: boto3's ``lambda-microvms`` client on this daemon (RunMicrovm, GetMicrovm...).
        self.api = self.session.client(
            "lambda-microvms",
            endpoint_url=self.url,
            region_name=self.region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, read_timeout=max(timeout, 300), connect_timeout=30),
        )
        self._http = urllib3.PoolManager(retries=False, maxsize=8)

    # -- the Lambda MicroVMs API -------------------------------------------------------

    def call(self, operation: str, **params: Any) -> Dict[str, Any]:
        """Calls API operation ``operation`` (boto3's snake_case name, e.g. ``run_microvm``)."""
        try:
            out = getattr(self.api, operation)(**params)
        except ClientError as e:
            raise errors.from_client_error(e) from None
        except ParamValidationError as e:
            # botocore checks the model's constraints before sending: the same refusal.
            raise errors.ValidationError(str(e), code="ValidationException") from None
        out.pop("ResponseMetadata", None)
        return dict(out)

    # -- Hearth's extensions -----------------------------------------------------------

    def url_for(self, path: str, query: Optional[Mapping[str, str]] = None) -> str:
        """The daemon's URL of ``path`` (absolute, starting with ``/``) with ``query``."""
        u = self.url + path
        if query:
            u += "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")
        return u

    def signed_headers(
        self, method: str, url: str, body: bytes = b"", headers: Optional[Mapping[str, str]] = None, payload_sha256: Optional[str] = None
    ) -> Dict[str, str]:
        """Headers that sign a request with SigV4 (botocore's): over ``body``, or over a body
        whose SHA-256 is ``payload_sha256`` (sent as ``X-Amz-Content-Sha256``, for a body
        streamed from a file)."""
        req = AWSRequest(method=method, url=url, data=b"" if payload_sha256 else body, headers=dict(headers or {}))
        if payload_sha256:
            req.headers["X-Amz-Content-SHA256"] = payload_sha256
        SigV4Auth(self._credentials.get_frozen_credentials(), "lambda", self.region).add_auth(req)
        return dict(req.headers.items())

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, str]] = None,
        body: Union[bytes, Any] = b"",
        headers: Optional[Mapping[str, str]] = None,
        payload_sha256: Optional[str] = None,
        stream: bool = False,
        timeout: Optional[float] = None,
    ) -> urllib3.BaseHTTPResponse:
        """A signed request to the daemon. ``body`` is bytes, or a file object read as it is
        sent (then give ``payload_sha256`` and a ``Content-Length`` header). With ``stream``
        the response's body is left to read. Errors raise :class:`hearth.errors.HearthError`."""
        url = self.url_for(path, query)
        signed = self.signed_headers(method, url, body if isinstance(body, bytes) else b"", headers, payload_sha256)
        t = self.timeout if timeout is None else timeout
        try:
            r = self._http.request(
                method,
                url,
                body=body if (not isinstance(body, bytes) or body) else None,
                headers=signed,
                preload_content=not stream,
                timeout=urllib3.Timeout(connect=30, read=t),
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as e:
            raise errors.HearthError(f"{method} {path}: {e}") from None
        if r.status >= 300:
            data = r.data if not stream else r.read()
            r.release_conn()
            raise errors.from_response(r.status, r.headers.get("x-amzn-errortype"), data)
        return r

    def json(self, method: str, path: str, payload: Optional[Mapping[str, Any]] = None, **kw: Any) -> Any:
        """A signed JSON request; its JSON answer."""
        import json as _json

        body = _json.dumps(payload).encode() if payload is not None else b""
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        r = self.request(method, path, body=body, headers=headers, **kw)
        return _json.loads(r.data or b"{}")


def iter_lines(r: urllib3.BaseHTTPResponse, chunk: int = 65536) -> Iterable[bytes]:
    """The lines of a streamed response as they arrive."""
    buf = b""
    for data in r.stream(chunk, decode_content=True):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line
    if buf:
        yield buf
