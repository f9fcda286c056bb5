"""The lead webhook (Make.com / Zapier style): every captured lead POSTed as signed JSON.

The URL is per business (`[profile.escalation] webhook_url`); the signing secret is
`LEAD_WEBHOOK_SECRET`. The receiver checks

    X-Switchboard-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>
    X-Switchboard-Timestamp: <unix seconds>

(the timestamp is signed too, so a captured request cannot be replayed later with a new one).
Delivery is retried with backoff on 5xx, 429 and network errors, a bounded number of times,
and always runs in the notifier's background tasks: a slow receiver never holds up a caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from tools.notify import RetryPolicy

if TYPE_CHECKING:
    from prompts.profiles import BusinessProfile
    from tools.db.models import Lead

log = logging.getLogger("switchboard.lead_webhook")

SIGNATURE_HEADER = "X-Switchboard-Signature"
TIMESTAMP_HEADER = "X-Switchboard-Timestamp"
EVENT = "lead.captured"
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The header value for `body` sent at `timestamp`: `sha256=<hex>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str, *, max_age_s: int = 300) -> bool:
    """What a receiver does (and what our tests do): constant-time check plus freshness."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > max_age_s:
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), header)


def lead_payload(lead: Lead, profile: BusinessProfile, *, channel: str) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment is not None else None

    return {
        "event": EVENT,
        "business": {"id": profile.id, "name": profile.name},
        "lead": {
            "id": lead.id,
            "name": lead.name,
            "phone": lead.phone,
            "job": lead.job_type,
            "address": lead.address,
            "urgency": lead.urgency,
            "status": lead.status,
            "source": lead.source,
            "notes": lead.notes,
            "photos": list(lead.photos or []),
            "conversation_id": lead.conversation_id,
            "created_at": iso(lead.created_at),
        },
        "channel": channel,
    }


async def post_lead(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    *,
    secret: str | None,
    policy: RetryPolicy,
) -> bool:
    """POST `payload` to `url`, signed when there is a secret; True once a 2xx came back."""
    body = orjson.dumps(payload)
    attempts = max(1, policy.attempts)
    for attempt in range(1, attempts + 1):
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp)}
        if secret:
            headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
        try:
            response = await client.post(
                url, content=body, headers=headers, timeout=policy.timeout_s
            )
            if 200 <= response.status_code < 300:
                return True
            problem = f"HTTP {response.status_code}"
            retry = response.status_code in _RETRY_STATUSES
        except httpx.HTTPError as error:
            problem, retry = type(error).__name__, True
        if not retry or attempt == attempts:
            log.error("lead webhook to %s failed after %d attempt(s): %s", url, attempt, problem)
            return False
        await asyncio.sleep(policy.delay(attempt))
    return False
