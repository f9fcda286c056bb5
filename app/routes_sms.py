"""Twilio's messaging webhooks: an inbound text (answered with TwiML) and delivery reports.

`POST /sms/incoming` is signature-checked, then idempotent per `MessageSid`: the inbound
message row is the key (`messages.message_sid` is unique), so a retried webhook — Twilio
retries when our answer is slow or lost — gets an empty `<Response/>` and causes neither a
second reply nor a second tool action. The conversation turn runs as a background task of the
notifier: if it ends within `SMS_REPLY_DEADLINE_S` the reply is the TwiML `<Message>`;
otherwise the webhook is answered empty at once and the reply follows through Twilio's REST
API when the turn ends (Twilio gives up on a webhook after 15 s).

`POST /sms/status` records delivery reports for the texts we sent (out-of-order reports
never move a message backwards).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from starlette.responses import Response
from twilio.twiml.messaging_response import MessagingResponse

from app import correlation
from app.limits import SMS_PER_NUMBER, RateLimiter
from app.security import verified_form
from app.sms_engine import InboundText, Media, Turn
from tools.records import record_message_status, save_message

if TYPE_CHECKING:
    from starlette.datastructures import FormData
    from starlette.requests import Request

    from app.services import Services

log = logging.getLogger("switchboard.sms")

TWIML_MEDIA_TYPE = "text/xml"
MAX_MEDIA = 10  # Twilio delivers at most 10 media items per MMS


def media_of(form: FormData) -> tuple[Media, ...]:
    """The MMS attachments (`NumMedia`, `MediaUrl{N}`, `MediaContentType{N}`)."""
    try:
        count = min(int(form.get("NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        count = 0
    items = []
    for index in range(max(count, 0)):
        url = str(form.get(f"MediaUrl{index}") or "")
        if url.startswith(("https://", "http://")):
            kind = str(form.get(f"MediaContentType{index}") or "application/octet-stream")
            items.append(Media(url, kind))
    return tuple(items)


def twiml_reply(text: str | None) -> Response:
    response = MessagingResponse()
    if text:
        response.message(text)
    return Response(str(response), media_type=TWIML_MEDIA_TYPE)


async def sms_incoming(request: Request) -> Response:
    form = await verified_form(request)
    services: Services = request.app.state.services
    sid = str(form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid") or "")
    correlation.bind(message_sid=sid)
    to, sender = str(form.get("To") or ""), str(form.get("From") or "")
    body = str(form.get("Body") or "")
    about = {"message_sid": sid, "to": to, "from": sender}
    profile = services.profiles.for_number(to)
    if profile is None:
        log.warning("text to a number no profile answers: ignored", extra=about)
        return twiml_reply(None)
    if not sid or not sender:
        log.error("signed SMS webhook without MessageSid or From: ignored", extra=about)
        return twiml_reply(None)
    about["tenant"] = profile.id
    media = media_of(form)
    fresh = await save_message(
        services.db,
        profile.id,
        direction="inbound",
        from_number=sender,
        to_number=to,
        body=body,
        message_sid=sid,
        status="received",
        media=[{"url": m.url, "content_type": m.content_type} for m in media],
    )
    if not fresh:
        log.info("repeated SMS webhook (same MessageSid): not answered again", extra=about)
        return twiml_reply(None)
    if form.get("OptOutType"):
        # STOP / START / HELP under Twilio's Advanced Opt-Out: Twilio answers those itself.
        log.info("opt-out keyword (%s): left to Twilio", form.get("OptOutType"), extra=about)
        return twiml_reply(None)
    limiter = RateLimiter(services.kv, services.metrics)
    decision = await limiter.hit(
        SMS_PER_NUMBER, f"{profile.id}:{sender}", limit=services.settings.max_sms_per_number_per_min
    )
    if not decision.allowed:
        log.warning("SMS over the per-number limit: stored, not answered", extra=about)
        return twiml_reply(None)
    engine = services.sms_engine
    text = InboundText(profile, sender, to, body, sid, media)
    task = _start(services, engine.handle(text), f"sms turn {sid}")
    await asyncio.wait({task}, timeout=services.settings.sms_reply_deadline_s)
    if task.done():
        turn = None if task.cancelled() else task.result()
        if turn is None:  # the notifier logged the failure (a bug: turns answer their troubles)
            log.error("SMS turn failed: no reply", extra=about)
            return twiml_reply(None)
        await _record_reply(services, text, turn.reply)
        log.info("SMS answered in the webhook", extra=about | _turn_info(turn))
        return twiml_reply(turn.reply)
    log.warning(
        "SMS turn slower than %gs: answered the webhook, the reply follows by REST",
        services.settings.sms_reply_deadline_s,
        extra=about,
    )
    task.add_done_callback(lambda done: _reply_later(services, text, done))
    return twiml_reply(None)


def _start(services: Services, work: Coroutine[Any, Any, Turn], name: str) -> asyncio.Task[Any]:
    # The notifier tracks the task, so shutdown waits for it and the reply is not lost.
    return services.notifier.spawn(work, name)


def _reply_later(services: Services, text: InboundText, task: asyncio.Task[Any]) -> None:
    turn: Turn | None = None if task.cancelled() else task.result()
    if turn is None:
        log.error("deferred SMS turn for %s ended without a reply", text.message_sid)
        return
    services.notifier.spawn(
        services.notifier.send_sms(text.profile.id, text.from_number, turn.reply, reason="reply"),
        "deferred sms reply",
    )


async def _record_reply(services: Services, text: InboundText, reply: str) -> None:
    try:
        await save_message(
            services.db,
            text.profile.id,
            direction="outbound",
            from_number=text.to_number,
            to_number=text.from_number,
            body=reply,
            status="twiml",
            reason="reply",
        )
    except Exception:
        log.exception("could not store the SMS reply for %s", text.message_sid)


def _turn_info(turn: Turn) -> dict[str, object]:
    return {
        "model": turn.route.model if turn.route else None,
        "tier": turn.route.tier if turn.route else None,
        "rounds": turn.rounds,
        "tools": turn.tools,
    }


async def sms_status(request: Request) -> Response:
    form = await verified_form(request)
    services: Services = request.app.state.services
    sender, to = str(form.get("From") or ""), str(form.get("To") or "")
    # Reports are about texts we sent: from our number.
    profile = services.profiles.for_number(sender) or services.profiles.for_number(to)
    tenant = profile.id if profile is not None else None
    about = {
        "message_sid": form.get("MessageSid", ""),
        "message_status": form.get("MessageStatus", ""),
        "tenant": tenant,
    }
    try:
        recorded = await record_message_status(services.db, tenant, dict(form))
    except ValueError as error:
        log.warning("SMS status callback ignored: %s", error, extra=about)
        return Response(status_code=204)
    except Exception:
        # A report, not a request: failing it only makes Twilio retry into the same failure.
        log.exception("could not record an SMS status callback", extra=about)
        return Response(status_code=204)
    log.info("SMS status %s", "recorded" if recorded else "ignored", extra=about)
    return Response(status_code=204)
