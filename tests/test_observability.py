"""What an operator sees: JSON log lines tagged with the call they belong to, phone numbers cut
to their last four digits, no secret anywhere, and Prometheus metrics that move with a call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import httpx
import orjson
import pytest

from app import correlation
from app.logging_setup import JsonFormatter, register_secret
from app.metrics import metric_sample
from bridge.sim.caller import DEMO_SCRIPT
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    simulated_call,
)

OPENAI_KEY = "sk-test-observability-0123456789abcdef"


class Lines(logging.Handler):
    """Every record formatted by the production formatter, as the log shipper would get it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_logs() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# -- correlation ids, without a server ---------------------------------------------------------


async def test_ids_follow_the_task_that_bound_them_and_its_children(json_logs: Lines) -> None:
    log = logging.getLogger("switchboard.test")

    async def one_call(call_sid: str) -> None:
        correlation.bind(call_sid=call_sid)
        await asyncio.sleep(0)

        async def tool_run() -> None:
            log.info("tool ran")

        await asyncio.create_task(tool_run())  # like a tool task started by the call

    await asyncio.gather(one_call("CA-one"), one_call("CA-two"))
    log.info("outside any call")

    records = [orjson.loads(line) for line in json_logs.lines]
    assert sorted(r.get("call_sid") for r in records if r["msg"] == "tool ran") == [
        "CA-one",
        "CA-two",
    ]
    (outside,) = [r for r in records if r["msg"] == "outside any call"]
    assert "call_sid" not in outside


def test_numbers_are_redacted_in_messages_and_fields() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("x", logging.INFO, "", 0, "call from %s", ("+14155550123",), None)
    record.to = "+15005550006"
    record.form = {"From": "+14155550123", "Body": "call me on +447700900123"}
    line = formatter.format(record)
    assert "+14155550123" not in line and "4155550123" not in line
    assert "+447700900123" not in line
    parsed = orjson.loads(line)
    assert parsed["msg"] == "call from +*******0123"
    assert parsed["to"] == "+*******0006"


def test_redaction_can_be_turned_off_but_secrets_stay_scrubbed() -> None:
    # LOG_REDACT_PHONE_NUMBERS=false: numbers are kept whole; secrets never are.
    formatter = JsonFormatter(redact=False)
    record = logging.LogRecord(
        "x", logging.INFO, "", 0, "call from %s with %s", ("+14155550123", "Bearer sk-abc123"), None
    )
    parsed = orjson.loads(formatter.format(record))
    assert "+14155550123" in parsed["msg"]
    assert "sk-abc123" not in parsed["msg"]


# -- a whole call ------------------------------------------------------------------------------


async def test_a_call_leaves_json_logs_with_its_id_and_moves_the_metrics(
    json_logs: Lines, sqlite_url: str, tmp_path
) -> None:
    async with call_stack(
        "demo", database_url=sqlite_url, openai_api_key=OPENAI_KEY, spool_dir=tmp_path / "s"
    ) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            before = (await http.get("/metrics")).text
            forged = await http.post(
                "/voice/incoming",
                data={"CallSid": "CA" + "0" * 32, "From": CALLER_NUMBER, "To": BUSINESS_NUMBER},
                headers={"X-Twilio-Signature": "forged"},
            )
            report = await simulated_call(stack, DEMO_SCRIPT)
            after = (await http.get("/metrics")).text
            health = await http.get("/healthz")
            stack.services.draining = True
            draining = await http.get("/readyz")
            stack.services.draining = False
            bearer = stack.emulator.sessions[0]

    assert forged.status_code == 403
    assert report.violations == []

    # -- logs: JSON, correlated, redacted, secret-free ------------------------------------
    text = "\n".join(json_logs.lines)
    records = [orjson.loads(line) for line in json_logs.lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    ours = [r for r in records if r["logger"].startswith(("switchboard", "tools", "bridge"))]
    assert ours
    (ended,) = [r for r in ours if r["logger"] == "switchboard.media" and "ended" in r["msg"]]
    assert ended["call_sid"] == report.call_sid  # bound by the media socket, not passed in
    answered = [r for r in ours if r["msg"].startswith("call answered")]
    assert answered and answered[0]["call_sid"] == report.call_sid
    assert {r["call_sid"] for r in ours if "call_sid" in r} <= {report.call_sid, "CA" + "0" * 32}
    assert CALLER_NUMBER not in text and BUSINESS_NUMBER not in text
    assert "+*******0199" in text  # the caller is still identifiable by the last four digits
    assert AUTH_TOKEN not in text
    assert OPENAI_KEY not in text
    assert bearer is not None  # the key really was in use on this call (sent upstream)

    # -- metrics: present and moving ---------------------------------------------------------
    for name in (
        "switchboard_active_calls",
        "switchboard_upstream_reconnects_total",
        "switchboard_upstream_errors_total",
        "switchboard_added_latency_seconds_count",
        "switchboard_limit_rejections_total",
        "switchboard_spooled_records",
    ):
        assert metric_sample(after, name) is not None or name.endswith("_total"), name
    assert metric_sample(after, "switchboard_active_calls") == 0
    assert (metric_sample(after, "switchboard_frames_in_total") or 0) > (
        metric_sample(before, "switchboard_frames_in_total") or 0
    )
    assert (metric_sample(after, "switchboard_frames_out_total") or 0) > 0
    assert (
        metric_sample(
            after, "switchboard_tool_calls_total", tool="capture_lead", outcome="proposed"
        )
        == 1
    )
    assert (
        metric_sample(
            after, "switchboard_tool_calls_total", tool="capture_lead", outcome="executed"
        )
        == 1
    )
    assert metric_sample(after, "switchboard_tool_calls_total", tool="end_call", outcome="ok") == 1
    assert metric_sample(after, "switchboard_confirmations_total", outcome="proposed") == 1
    assert metric_sample(after, "switchboard_confirmations_total", outcome="executed") == 1
    assert metric_sample(after, "switchboard_tool_duration_seconds_count", tool="end_call") == 1
    assert metric_sample(after, "switchboard_webhook_rejections_total", reason="bad_signature") == 1
    assert metric_sample(after, "switchboard_calls_total", outcome="connected") == 1

    # -- probes: alive is not the same as ready ------------------------------------------------
    assert health.status_code == 200
    assert draining.status_code == 503 and draining.json()["reasons"] == ["draining"]


def test_credentials_are_scrubbed_whoever_logs_them() -> None:
    register_secret("twilio-auth-token-value-123")
    lines = {
        "> Authorization: Bearer abc.DEF-123_token": "abc.DEF-123_token",
        "authorization: Basic QUMxMjM6c2VjcmV0": "QUMxMjM6c2VjcmV0",
        "key sk-proj-AbCdEf0123456789 rejected": "AbCdEf0123456789",
        "signing with twilio-auth-token-value-123 now": "twilio-auth-token-value-123",
    }
    formatter = JsonFormatter()
    for text, secret in lines.items():
        record = logging.LogRecord("x", logging.DEBUG, "", 0, text, None, None)
        record.header = text  # in `extra=` fields too
        line = formatter.format(record)
        assert secret not in line and "[redacted]" in line, line
    kept = logging.LogRecord("x", logging.INFO, "", 0, "task-12345678 and disk-usage", None, None)
    assert "task-12345678 and disk-usage" in formatter.format(kept)
