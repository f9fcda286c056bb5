"""Prometheus metrics for one app instance, in a registry of its own.

A private `CollectorRegistry` (not prometheus_client's global one) lets tests and the demo
build several apps in one process without "duplicated timeseries" errors.

Hot path note: a prometheus counter increment takes a lock. The bridge should count frames in
plain ints on its CallSession and add them here in batches (e.g. once a second and at hang-up),
not once per 20 ms frame.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response

NAMESPACE = "switchboard"
# Runner outcomes that only the confirmation protocol produces (see tools.runner).
CONFIRMATION_OUTCOMES = frozenset(
    {"proposed", "executed", "rejected", "expired", "cancelled", "unavailable"}
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = NAMESPACE

        # -- calls ---------------------------------------------------------------------
        self.active_calls = Gauge(
            "active_calls", "Media streams currently bridged.", namespace=ns, registry=r
        )
        self.calls = Counter(
            "calls",
            "Incoming-call webhooks answered, by what the caller got "
            "(connected, unknown_number, busy, draining).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.call_duration = Histogram(
            "call_duration_seconds",
            "Bridged call length.",
            namespace=ns,
            registry=r,
            buckets=(15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
        )

        # -- audio ---------------------------------------------------------------------
        self.frames_in = Counter(
            "frames_in", "Audio frames received from Twilio.", namespace=ns, registry=r
        )
        self.frames_out = Counter(
            "frames_out", "Audio frames sent to Twilio.", namespace=ns, registry=r
        )
        self.frames_dropped = Counter(
            "frames_dropped",
            "Audio frames dropped, by reason.",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.barge_ins = Counter(
            "barge_ins", "Times the caller interrupted the assistant.", namespace=ns, registry=r
        )

        # -- tools ---------------------------------------------------------------------
        self.tool_calls = Counter(
            "tool_calls",
            "Tool invocations by tool and outcome (ok, proposed, confirmed, declined, error...).",
            ["tool", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.tool_duration = Histogram(
            "tool_duration_seconds",
            "Tool handler run time.",
            ["tool"],
            namespace=ns,
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

        # -- edges ---------------------------------------------------------------------
        self.webhook_rejections = Counter(
            "webhook_rejections",
            "Webhooks and media upgrades refused, by reason.",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.status_callbacks = Counter(
            "status_callbacks",
            "Call status callbacks, by outcome (recorded, duplicate, error).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Errors from the Realtime upstream (error events, failed connects, drops).",
            namespace=ns,
            registry=r,
        )
        self.upstream_connect = Histogram(
            "upstream_connect_seconds",
            "Time to open the Realtime session (connect to session.updated).",
            namespace=ns,
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
        )

        # -- resilience and observability (outages, limits) ---------------------------------
        self.upstream_reconnects = Counter(
            "upstream_reconnects",
            "Realtime sessions re-opened after the upstream dropped mid-call.",
            namespace=ns,
            registry=r,
        )
        self.added_latency = Histogram(
            "added_latency_seconds",
            "Time the bridge adds to audio passing through it (frame in to frame out).",
            namespace=ns,
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
        )
        self.barge_in_reaction = Histogram(
            "barge_in_reaction_seconds",
            "Barge-in: the model's speech_started arriving to the clear handed to Twilio's socket.",
            namespace=ns,
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
        )
        self.confirmations = Counter(
            "confirmations",
            "Confirmation protocol steps by outcome (proposed, executed, rejected, expired, "
            "cancelled, unavailable).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        self.limit_rejections = Counter(
            "limit_rejections",
            "Requests refused by a configured limit, by limit (calls_per_caller, "
            "concurrent_calls, sms_per_number...).",
            ["limit"],
            namespace=ns,
            registry=r,
        )
        self.limits_failed_open = Counter(
            "limits_failed_open",
            "Rate-limit checks skipped because Redis was unreachable (the request went ahead).",
            ["limit"],
            namespace=ns,
            registry=r,
        )
        self.spooled_records = Gauge(
            "spooled_records",
            "Records waiting on local disk for the database to come back.",
            namespace=ns,
            registry=r,
        )
        self.spool_events = Counter(
            "spool_events",
            "Spool activity by event (spooled, replayed, failed) and record kind.",
            ["event", "kind"],
            namespace=ns,
            registry=r,
        )

    def observe_tool_run(self, tool: str, outcome: str, latency_s: float) -> None:
        """A `tools.runner` observer: every tool run, by tool and outcome."""
        self.tool_calls.labels(tool, outcome).inc()
        self.tool_duration.labels(tool).observe(latency_s)
        if outcome in CONFIRMATION_OUTCOMES:
            self.confirmations.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.services.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def metric_sample(
    text: str, name: str, *, absent: float | None = None, **labels: str
) -> float | None:
    """Sample `name` with `labels` in a Prometheus text exposition (`absent` if it is not there)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return absent
