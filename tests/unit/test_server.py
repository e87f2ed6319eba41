"""clipcap serve's guard around MLflow's scoring app, driven as ASGI in process with a stand-in app: a bounded
queue that answers 503 at once, a body limit, JSON checked first, and every error one short line."""

import asyncio
import json

import pytest

from clipcap.config import ServeConfig
from clipcap.modeling.serving import REFUSAL_MARK
from clipcap.pipeline.server import Guard, one_line


def _scope(path="/invocations", content_type=b"application/json"):
    return {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", content_type)]}


async def _call(app, body: bytes, scope=None, chunk: int = 65_536) -> tuple[int, bytes]:
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    queue = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope or _scope(), receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


class StandIn:
    """An app that answers with a given status and body, after waiting on ``gate`` when one is set."""

    def __init__(self, status=200, body=b'{"predictions": ["A cat."]}') -> None:
        self.status, self.body, self.gate, self.seen, self.running, self.most = status, body, None, [], 0, 0

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.seen.append(message["body"])
        self.running += 1
        self.most = max(self.most, self.running)
        if self.gate is not None:
            await self.gate.wait()
        self.running -= 1
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": self.body})


def test_requests_pass_through_unchanged():
    app = StandIn()
    status, body = asyncio.run(_call(Guard(app, ServeConfig()), b'{"dataframe_split": {}}'))
    assert (status, body) == (200, b'{"predictions": ["A cat."]}') and app.seen == [b'{"dataframe_split": {}}']


def test_past_the_queue_requests_get_503_at_once_and_the_rest_run_a_few_at_a_time():
    limits = ServeConfig(max_concurrent=2, max_queued=3)

    async def burst():
        app = StandIn()
        app.gate = asyncio.Event()
        guard = Guard(app, limits)
        tasks = [asyncio.create_task(_call(guard, b"{}")) for _ in range(8)]
        await asyncio.sleep(0.05)
        early = [t.result() for t in tasks if t.done()]   # answered while every admitted request still waits
        app.gate.set()
        return early, await asyncio.gather(*tasks), app.most

    early, answers, most = asyncio.run(burst())
    assert sorted(status for status, _ in early) == [503, 503, 503]     # 8 - (2 running + 3 queued), at once
    assert sorted(status for status, _ in answers) == [200] * 5 + [503] * 3
    assert most == 2                                                    # never more than max_concurrent at once
    assert all(b"serve.max_queued" in body and len(body) < 1000 for status, body in early)


def test_a_body_over_the_limit_gets_413_and_is_never_passed_on():
    app = StandIn()
    limits = ServeConfig(max_request_bytes=1000)
    def body(size: int) -> bytes:
        return b'{"x": "' + b"z" * (size - 9) + b'"}'

    assert len(body(1001)) == 1001
    status, answer = asyncio.run(_call(Guard(app, limits), body(1001), chunk=100))
    assert status == 413 and b"serve.max_request_bytes" in answer and app.seen == []
    assert asyncio.run(_call(Guard(app, limits), body(1000), chunk=100))[0] == 200
    assert asyncio.run(_call(Guard(app, limits), body(50_000), chunk=100))[0] == 413  # past the drain: cut short


@pytest.mark.parametrize("body, found", [
    (b'{"dataframe_split": {"columns": ["image"], "data": [["' + b"A" * 100_000, b"not valid JSON"),
    (b"[" * 10_000 + b"]" * 10_000, b"nested too deeply"),
    (b'"just a string"', b"expected a JSON object"),
    (b'{"a": "\xff"}', b"not UTF-8"),
])
def test_bad_json_is_refused_before_the_model_in_one_line_without_an_echo(body, found):
    app = StandIn()
    status, answer = asyncio.run(_call(Guard(app, ServeConfig()), body))
    assert status == 400 and found in answer and app.seen == []
    assert len(answer) < 1000 and b"AAAA" not in answer and b"\n" not in answer


def test_the_models_own_refusals_pass_as_they_are():
    refusal = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "image 3: 5x100000, one side more "
                          "than 32 times the other (serve.max_aspect_ratio)", REFUSAL_MARK: True}).encode()
    status, body = asyncio.run(_call(Guard(StandIn(400, refusal), ServeConfig()), b"{}"))
    assert status == 400 and json.loads(body) == {"error_code": "INVALID_PARAMETER_VALUE", "message":
                                                  "image 3: 5x100000, one side more than 32 times the other "
                                                  "(serve.max_aspect_ratio)"}


@pytest.mark.parametrize("status", [400, 415, 422, 500, 504])
def test_any_other_error_is_replaced_by_one_line_for_its_status(status):
    echo = json.dumps({"error_code": "BAD_REQUEST", "message": "Failed to predict data '" + "Q" * 50_000 + "'",
                       "stack_trace": "Traceback (most recent call last):\n  File \"/venv/lib/x.py\""}).encode()
    code, body = asyncio.run(_call(Guard(StandIn(status, echo), ServeConfig()), b"{}"))
    assert code == status and len(body) < 1000 and b"QQQ" not in body and b"Traceback" not in body
    assert b"\n" not in body and json.loads(body)["message"]
    # a forged mark with a multi-line message is not trusted either
    forged = json.dumps({"message": "one\nTraceback", REFUSAL_MARK: True}).encode()
    assert b"Traceback" not in one_line(400, forged)


def test_other_paths_keep_their_answers_but_not_their_error_bodies():
    ok = asyncio.run(_call(Guard(StandIn(200, b"\n"), ServeConfig()), b"", _scope("/ping")))
    assert ok == (200, b"\n")
    status, body = asyncio.run(_call(Guard(StandIn(404, b"Not Found " * 500), ServeConfig()), b"", _scope("/x")))
    assert status == 404 and len(body) < 1000
