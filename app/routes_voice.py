"""Twilio's voice webhooks: the incoming call (answered with TwiML) and call status callbacks.

Both are signature-checked before anything else happens (`app.security.verified_form`). Both
answer fast: Twilio waits on the incoming-call answer while the caller hears ringing, and a
status callback that times out is retried.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from starlette.responses import Response

from app import correlation, twiml
from app.limits import CALLS_PER_CALLER, CONCURRENT_CALLS, RateLimiter
from app.security import verified_form
from tools.records import record_call_status

if TYPE_CHECKING:
    from starlette.datastructures import FormData
    from starlette.requests import Request

    from app.services import Services

log = logging.getLogger("switchboard.voice")

TWIML_MEDIA_TYPE = "text/xml"


async def voice_incoming(request: Request) -> Response:
    form = await verified_form(request)
    services: Services = request.app.state.services
    call_sid = form.get("CallSid", "")
    called = form.get("To", "")
    caller = form.get("From", "")
    correlation.bind(call_sid=call_sid)
    about = {"call_sid": call_sid, "to": called, "from": caller}

    profile = services.profiles.for_number(called)
    if profile is None:
        log.warning("call to a number no profile answers: told the caller, hung up", extra=about)
        return _answer(services, "unknown_number", twiml.unknown_number())
    about["tenant"] = profile.id
    if services.draining:
        log.info("call refused while draining: busy message", extra=about)
        return _answer(services, "draining", twiml.busy())
    limiter = RateLimiter(services.kv, services.metrics)
    if services.at_capacity:
        live = len(services.calls)
        log.warning("call refused at capacity (%d live calls): busy message", live, extra=about)
        limiter.rejected(CONCURRENT_CALLS)
        return _answer(services, "busy", twiml.busy())
    if not call_sid:
        log.error("signed incoming-call webhook without a CallSid", extra=about)
        return _answer(services, "error", twiml.unavailable())
    per_caller = services.settings.max_calls_per_caller_per_min
    decision = await limiter.hit(CALLS_PER_CALLER, caller, limit=per_caller)
    if not decision.allowed:
        log.warning(
            "call refused: over %d calls per minute from this number", per_caller, extra=about
        )
        return _answer(services, "rate_limited", twiml.busy())

    try:
        token = await services.tokens.mint(
            call_sid,
            profile.id,
            caller,
            called,
            persona=profile.persona,
            account_sid=form.get("AccountSid") or None,
        )
    except (RedisError, OSError):
        log.exception("could not store the stream token: unavailable message", extra=about)
        return _answer(services, "error", twiml.unavailable())
    log.info("call answered: connecting the media stream", extra=about)
    document = twiml.connect_stream(services.settings.media_stream_url, token)
    return _answer(services, "connected", document)


async def voice_status(request: Request) -> Response:
    form = await verified_form(request)
    services: Services = request.app.state.services
    called, caller = form.get("To", ""), form.get("From", "")
    # Inbound calls are to our number, calls we place are from it.
    profile = services.profiles.for_number(called) or services.profiles.for_number(caller)
    tenant = profile.id if profile is not None else None
    correlation.bind(call_sid=form.get("CallSid", ""))
    about = {
        "call_sid": form.get("CallSid", ""),
        "call_status": form.get("CallStatus", ""),
        "sequence": form.get("SequenceNumber", ""),
        "tenant": tenant,
    }
    try:
        recorded = await _record_status(services, tenant, form)
    except Exception:
        # The callback is a report, not a request: failing it only makes Twilio retry into
        # the same failure. Log it loudly and acknowledge.
        log.exception("could not record a call status callback", extra=about)
        services.metrics.status_callbacks.labels("error").inc()
        return Response(status_code=204)
    outcome = "recorded" if recorded else "duplicate"
    services.metrics.status_callbacks.labels(outcome).inc()
    log.info("call status %s", outcome, extra=about)
    return Response(status_code=204)


def _answer(services: Services, outcome: str, document: str) -> Response:
    services.metrics.calls.labels(outcome).inc()
    return Response(document, media_type=TWIML_MEDIA_TYPE)


async def _record_status(services: Services, tenant: str | None, form: FormData) -> bool:
    """Record the callback once; False if this very callback was already recorded."""
    return await record_call_status(services.db, tenant, dict(form))
