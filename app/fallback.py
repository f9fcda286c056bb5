"""When no Realtime session can serve a call: apologise, promise a callback, tell the owner.

Three things happen, each on its own so one failing never stops the others or crashes the
call handler:

1. the live call is redirected (Twilio REST, `POST /2010-04-01/Accounts/{Sid}/Calls/{CallSid}.json`
   with `Twiml=`) to a short `<Say>` apology and callback promise, then `<Hangup/>`; without
   Twilio credentials this is logged and recorded as not done (the caller's line just ends);
2. a lead row records the missed call (source voice, the caller's number, the CallSid),
   once per call however often this runs;
3. the owner numbers of the business get a text with the caller's number (through the
   process's `Notifier`, which stores every text even when it cannot send it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
from sqlalchemy import select

from app import twiml
from tools.db.models import Lead
from tools.db.tenancy import tenant_session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from app.settings import Settings
    from prompts.profiles import BusinessProfile
    from tools.context import Notifier

log = logging.getLogger("switchboard.fallback")

API_VERSION = "2010-04-01"
APOLOGY_MESSAGE = (
    "Sorry, our assistant can't take your call right now. We have your number and someone "
    "will call you back shortly. Goodbye."
)
MISSED_CALL_NOTE = "missed call: assistant unavailable"
MISSED_CALL_NAME = "Missed caller"
OWNER_TEXT_REASON = "missed_call"
DEFAULT_TWILIO_TIMEOUT_S = 10.0


@dataclass(slots=True)
class FallbackOutcome:
    """What the fallback managed to do (for the log line and the tests)."""

    redirected: bool = False
    redirect_detail: str = ""
    lead_id: int | None = None
    owner_texts: list[str] = field(default_factory=list)  # numbers texted

    def describe(self) -> str:
        lead = f"lead {self.lead_id}" if self.lead_id is not None else "no lead"
        texts = f"{len(self.owner_texts)} owner text(s)"
        redirect = "redirected" if self.redirected else "not redirected"
        return f"{redirect} ({self.redirect_detail}), {lead}, {texts}"


def apology_twiml() -> str:
    return twiml.say_and_hang_up(APOLOGY_MESSAGE)


def calls_url(api_url: str, account_sid: str, call_sid: str) -> str:
    return f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Calls/{call_sid}.json"


async def redirect_to_apology(
    settings: Settings, call_sid: str, *, client: httpx.AsyncClient | None = None
) -> tuple[bool, str]:
    """Replace the live call's TwiML with the apology; (done, what happened)."""
    sid, token = settings.twilio_account_sid, settings.twilio_auth_token
    if not sid or token is None:
        return False, "no Twilio credentials (TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN)"
    url = calls_url(settings.twilio_api_url, sid, call_sid)
    timeout = getattr(settings, "twilio_timeout_s", DEFAULT_TWILIO_TIMEOUT_S)
    owns_client = client is None
    http = client or httpx.AsyncClient(timeout=timeout)
    try:
        response = await http.post(
            url, data={"Twiml": apology_twiml()}, auth=(sid, token.get_secret_value())
        )
    except httpx.HTTPError as error:
        return False, f"Twilio unreachable: {type(error).__name__}: {error}"
    finally:
        if owns_client:
            await http.aclose()
    if response.status_code >= 300:
        return False, f"Twilio answered {response.status_code}: {response.text[:200]}"
    return True, f"Twilio answered {response.status_code}"


async def record_missed_call(
    db: async_sessionmaker[AsyncSession], tenant: str, call_sid: str, caller: str
) -> int:
    """The missed call as a lead (once per CallSid); returns the lead's id."""
    async with tenant_session(db, tenant) as session:
        existing = await session.scalar(
            select(Lead.id).where(Lead.conversation_id == call_sid, Lead.notes == MISSED_CALL_NOTE)
        )
        if existing is not None:
            return existing
        lead = Lead(
            name=MISSED_CALL_NAME,
            phone=caller or None,
            source="voice",
            urgency="urgent",  # someone called and got nobody: call them back soon
            notes=MISSED_CALL_NOTE,
            conversation_id=call_sid,
        )
        session.add(lead)
        await session.commit()
        return lead.id


def owner_text(profile: BusinessProfile, caller: str) -> str:
    who = caller or "an unknown number"
    return (
        f"{profile.name}: missed call from {who}. The assistant was unavailable; the caller "
        "was told someone will call back."
    )


async def text_owners(
    notifier: Notifier | None, profile: BusinessProfile, caller: str
) -> list[str]:
    """Text every owner number; returns the numbers the notifier took."""
    if notifier is None:
        log.warning("no notifier: the owner of %s is not texted about a missed call", profile.id)
        return []
    sent: list[str] = []
    for number in profile.owner_numbers:
        try:
            await notifier.send_sms(
                profile.id, number, owner_text(profile, caller), reason=OWNER_TEXT_REASON
            )
        except Exception:
            log.exception("could not text owner %s about a missed call", number)
        else:
            sent.append(number)
    return sent


async def fall_back(
    *,
    settings: Settings,
    db: async_sessionmaker[AsyncSession],
    notifier: Notifier | None,
    profile: BusinessProfile,
    call_sid: str,
    caller: str,
    why: str,
) -> FallbackOutcome:
    """Everything that happens when the assistant cannot take a live call. Never raises."""
    outcome = FallbackOutcome()
    try:
        outcome.redirected, outcome.redirect_detail = await redirect_to_apology(settings, call_sid)
    except Exception as error:  # a bug here must not cost the lead and the owner text
        log.exception("call %s: redirect to the apology failed", call_sid)
        outcome.redirect_detail = f"{type(error).__name__}: {error}"
    try:
        outcome.lead_id = await record_missed_call(db, profile.id, call_sid, caller)
    except Exception:
        log.exception("call %s: could not record the missed call as a lead", call_sid)
    outcome.owner_texts = await text_owners(notifier, profile, caller)
    log.error(
        "call %s: assistant unavailable (%s): %s",
        call_sid,
        why,
        outcome.describe(),
        extra={"call_sid": call_sid, "tenant": profile.id, "from": caller},
    )
    return outcome
