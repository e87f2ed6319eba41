"""``clipcap serve``: MLflow's own scoring app for a registered model, behind the server's limits.

``mlflow models serve`` runs the same app, but nothing in it bounds the server as a whole: its worker
threads are shared by every request, a request that outlives its 60 s timeout keeps its thread, a body
of any size is read, and its errors echo the request (malformed JSON: the whole body) or carry a
traceback. :class:`Guard` wraps the app (an ASGI middleware) so that, with the model's ``serve``
limits (:class:`clipcap.config.ServeConfig`):

- at most ``max_concurrent`` requests are worked on at once, ``max_queued`` more wait for a slot, and
  one more is answered **503** at once (``Retry-After``): a burst never takes every thread;
- a body over ``max_request_bytes`` is answered **413** without being read on;
- the JSON is parsed before MLflow sees it: malformed or too deeply nested bodies get **400**;
- every error is one line under 1 KB, ``{"error_code": ..., "message": ...}``, never an echo of the
  request and never a traceback: the model's own refusals (:class:`clipcap.pipeline.pyfunc.RequestRefused`,
  which name the image and the limit) pass as they are, anything else is replaced by a message for
  its status and logged here.

:func:`serve` runs it under uvicorn; SIGTERM stops accepting requests, gives the ones in flight
``GRACE_SECONDS``, then exits even if a generation thread is still running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from clipcap.config import ServeConfig
from clipcap.modeling.serving import REFUSAL_MARK

log = logging.getLogger(__name__)

GRACE_SECONDS = 5
DRAIN_FACTOR = 4
MAX_MESSAGE_CHARS = 600
USAGE = ('POST application/json {"dataframe_split": {"columns": ["image"], "data": [["<base64 image>"], ...]}, '
         '"params": {"num_beams": 3}}')
MESSAGES = {
    400: f"the request is not what this model takes: {USAGE}",
    404: "not found: POST /invocations, GET /ping, /health, /version",
    405: "method not allowed: POST /invocations",
    413: "the request body is larger than serve.max_request_bytes",
    415: "unsupported content type: send application/json (UTF-8)",
    422: f"the request is not what this model takes: {USAGE}",
    500: "the server failed on this request; its log has the details",
    503: "the server is busy (serve.max_concurrent requests running, serve.max_queued waiting): retry shortly",
    504: "the request took longer than the server's time limit (serve.max_seconds)",
}


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    return status, json.dumps({"error_code": code, "message": message[:MAX_MESSAGE_CHARS]}).encode()


def check_json(body: bytes) -> str | None:
    """Why ``body`` is not a JSON object this server passes on (None: it is one)."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        return "the JSON is nested too deeply"
    except UnicodeDecodeError:
        return "the body is not UTF-8 text"
    except ValueError as err:
        return f"the body is not valid JSON ({err.msg} at character {err.pos})"
    if not isinstance(parsed, dict):
        return f"expected a JSON object, got a JSON {type(parsed).__name__}: {USAGE}"
    return None


def one_line(status: int, body: bytes) -> bytes:
    """The body of an error response as the client sees it: the model's own refusal (one line already)
    or the message for its status; never the request, never a traceback."""
    try:
        found = json.loads(body)
    except ValueError:
        found = None
    if isinstance(found, dict) and found.get(REFUSAL_MARK) and isinstance(found.get("message"), str) \
            and "\n" not in found["message"]:
        return _error(status, found["message"], str(found.get("error_code", "INVALID_PARAMETER_VALUE")))[1]
    log.warning("HTTP %d: %s", status, body[:300].decode("utf-8", "replace").replace("\n", " | "))
    code = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
    return _error(status, MESSAGES.get(status, f"HTTP {status}"), code)[1]


class Guard:
    """ASGI middleware bounding MLflow's scoring app (see the module docstring)."""

    def __init__(self, app, limits: ServeConfig) -> None:
        self.app, self.limits = app, limits
        self.admitted = 0              # requests running or waiting for a slot
        self._slots: asyncio.Semaphore | None = None

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:        # made inside the server's event loop
            self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        return self._slots

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] != "/invocations":
            return await self.app(scope, receive, _one_line_errors(send))
        if self.admitted >= self.limits.max_concurrent + self.limits.max_queued:
            return await _respond(send, *_error(503, MESSAGES[503], "TEMPORARILY_UNAVAILABLE"), retry_after=True)
        self.admitted += 1
        try:
            body = await _read_body(receive, self.limits.max_request_bytes)
            if body is None:
                return await _respond(send, *_error(413, MESSAGES[413] + f" ({self.limits.max_request_bytes:,} bytes)",
                                                    "BAD_REQUEST"))
            async with self.slots:
                if _content_type(scope).startswith("application/json"):
                    problem = await asyncio.to_thread(check_json, body)
                    if problem:
                        return await _respond(send, *_error(400, problem, "BAD_REQUEST"))
                await self.app(scope, _replay(body), _one_line_errors(send))
        finally:
            self.admitted -= 1


def _content_type(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return value.decode("latin-1").lower()
    return ""


async def _read_body(receive, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes. The rest of an oversized body is read
    and dropped (up to ``DRAIN_FACTOR`` times the limit) so that the client, still sending, gets the 413
    rather than a reset connection; nothing past the limit is kept."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_FACTOR * limit:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks) if size <= limit else None


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # the app asks again only to learn of a disconnect: never, here
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _one_line_errors(send):
    """``send`` that replaces the body of every 4xx/5xx response by :func:`one_line`'s."""
    held: dict = {}

    async def guarded(message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                held["pass"] = True
                return await send(message)
            held["start"], held["body"] = message, b""
            return None
        if held.get("pass") or "start" not in held:
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return None
        status = held["start"]["status"]
        await _respond(send, status, one_line(status, held["body"]))

    return guarded


async def _respond(send, status: int, body: bytes, retry_after: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(model_uri: str):
    """MLflow's scoring app for ``model_uri`` (a served clipcap model) behind :class:`Guard`."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(model_uri)
    limits = getattr(model.unwrap_python_model(), "limits", None) or ServeConfig()
    # MLflow's own timeout (a 504 while the request's thread runs on) must never come first: the model
    # stops itself at serve.max_seconds
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(limits.max_seconds * 3 + 30))
    return Guard(scoring_server.init(model), limits), limits


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Serve ``model_uri`` until SIGTERM or Ctrl-C (then at most ``GRACE_SECONDS`` for requests in flight)."""
    import uvicorn

    app, limits = build_app(model_uri)
    log.info("serving %s on http://%s:%d/invocations (%d at once, %d queued, %s s per request)", model_uri, host,
             port, limits.max_concurrent, limits.max_queued, f"{limits.max_seconds:g}")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACE_SECONDS,
                                           log_level="warning", limit_concurrency=None))

    async def run() -> None:
        await server.serve()
        # asyncio.run would now wait for every worker thread, a generation included: exit instead
        log.info("stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    asyncio.run(run())
