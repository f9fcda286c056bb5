"""Outbound text messages (owner alerts, photo links, deferred SMS replies): the `Notifier`.

`send_sms` returns at once: the message is handed to a background task that this notifier
tracks (and `aclose` drains), so a live call or a webhook never waits on Twilio. The task

1. stores the message in SQL (`messages`, outbound, with its `reason`) before anything else,
   so nothing is ever lost: a crash, a Twilio outage or a missing configuration leaves a row;
2. posts it to Twilio's REST API (`{TWILIO_API_URL}/2010-04-01/Accounts/{Sid}/Messages.json`,
   basic auth, form fields as Twilio documents them) with a bounded timeout, retrying 5xx
   answers, 429 and network errors/timeouts with exponential backoff (bounded attempts);
3. records the outcome on the row: Twilio's `SM…` sid and status, or a dead letter
   (status `dead_letter`, `error_code` = Twilio's error code, `http_<status>` or `timeout`).

Without Twilio credentials (the embedded default) messages go to the local outbox (status
`outbox`), which `switchboard outbox` prints. Delivery reports arrive later on
`POST /sms/status` and move the row forward (`tools.records.record_message_status`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import select

from tools.db.models import Message
from tools.db.tenancy import tenant_session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

log = logging.getLogger("switchboard.notify")

API_VERSION = "2010-04-01"
OUTBOX = "outbox"  # no Twilio credentials: kept for `switchboard outbox`
PENDING = "sending"  # stored, Twilio not (yet) answered
DEAD_LETTER = "dead_letter"  # Twilio refused it, or every attempt failed
UNSENT = (OUTBOX, PENDING, DEAD_LETTER)
MAX_BODY_CHARS = 1600  # Twilio refuses longer bodies (error 21617)
MAX_BACKOFF_S = 30.0
# Twilio answers these when the request itself is wrong; retrying cannot help.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class TwilioAccount:
    account_sid: str
    auth_token: str
    api_url: str = "https://api.twilio.com"
    status_callback: str | None = None  # our POST /sms/status, for delivery reports

    @property
    def messages_url(self) -> str:
        return f"{self.api_url.rstrip('/')}/{API_VERSION}/Accounts/{self.account_sid}/Messages.json"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), with jitter."""
        base = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        return base * (0.5 + random.random() / 2)


@dataclass(frozen=True, slots=True)
class SendResult:
    status: str
    sid: str | None = None
    error_code: str | None = None
    attempts: int = 0


class SendError(Exception):
    def __init__(self, error_code: str, *, retry: bool) -> None:
        super().__init__(error_code)
        self.error_code = error_code
        self.retry = retry


async def post_message(
    client: httpx.AsyncClient,
    account: TwilioAccount,
    *,
    to: str,
    from_: str,
    body: str,
    policy: RetryPolicy,
    media_urls: Sequence[str] = (),
) -> SendResult:
    """Create one message at Twilio, retrying what may succeed later. Never raises."""
    form: list[tuple[str, str]] = [("To", to), ("From", from_), ("Body", body[:MAX_BODY_CHARS])]
    form += [("MediaUrl", url) for url in media_urls]
    if account.status_callback:
        form.append(("StatusCallback", account.status_callback))
    last = "unknown"
    attempts = max(1, policy.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return await _post_once(client, account, form, policy.timeout_s, attempt)
        except SendError as error:
            last = error.error_code
            if not error.retry:
                return SendResult(DEAD_LETTER, error_code=last, attempts=attempt)
        if attempt < attempts:
            delay = policy.delay(attempt)
            log.warning("twilio send failed (%s), attempt %d; retry in %.2fs", last, attempt, delay)
            await asyncio.sleep(delay)
    return SendResult(DEAD_LETTER, error_code=last, attempts=attempts)


async def _post_once(
    client: httpx.AsyncClient,
    account: TwilioAccount,
    form: list[tuple[str, str]],
    timeout_s: float,
    attempt: int,
) -> SendResult:
    try:
        response = await client.post(
            account.messages_url,
            # Encoded here: httpx's `data=` takes a dict, and MediaUrl repeats.
            content=urlencode(form),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            auth=(account.account_sid, account.auth_token),
            timeout=timeout_s,
        )
    except httpx.TimeoutException:
        raise SendError("timeout", retry=True) from None
    except httpx.HTTPError as error:
        raise SendError(f"net_{type(error).__name__}"[:16], retry=True) from None
    if response.status_code in (200, 201):
        payload = _json(response)
        return SendResult(
            str(payload.get("status") or "queued"), sid=payload.get("sid"), attempts=attempt
        )
    code = _json(response).get("code")
    error_code = str(code) if code else f"http_{response.status_code}"
    retry = response.status_code in _RETRY_STATUSES
    raise SendError(error_code[:16], retry=retry)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


class SmsNotifier:
    """The process's `tools.context.Notifier`: durable, retried, never blocking the caller."""

    def __init__(
        self,
        db: async_sessionmaker[AsyncSession],
        *,
        sender_for: Callable[[str], str | None],
        account: TwilioAccount | None,
        policy: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.db = db
        self.sender_for = sender_for  # tenant -> the number texts go out from
        self.account = account
        self.policy = policy or RetryPolicy()
        self._client = client
        self._owns_client = client is None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @property
    def uses_twilio(self) -> bool:
        return self.account is not None

    async def send_sms(self, tenant: str, to: str, body: str, *, reason: str) -> None:
        """Queue a text to `to`; returns before Twilio is contacted (see the module doc)."""
        if not to or not body.strip():
            raise ValueError("a text needs a recipient and a body")
        self.spawn(self._deliver(tenant, to, body, reason), f"sms:{reason}")

    def spawn(self, work: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run `work` in the background, tracked so shutdown waits for it; failures are logged.

        Also for work that must outlive the request or call that started it (a deferred SMS
        reply, an escalation found in a caller's last words).
        """

        async def guarded() -> Any:
            try:
                return await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background %s failed", name)
                return None

        task = asyncio.get_running_loop().create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) for background work, including work it starts; True if all ended."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._tasks:
                    await asyncio.gather(*list(self._tasks), return_exceptions=True)
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Drain, then cancel what is left (its rows stay `sending`) and close the client."""
        self._closing = True
        if not await self.drain(timeout_s):
            log.error("shutdown: %d text(s) still sending; left as 'sending'", len(self._tasks))
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    # -- the background work -----------------------------------------------------------------

    async def _deliver(self, tenant: str, to: str, body: str, reason: str) -> SendResult:
        sender = self.sender_for(tenant) or ""
        status = PENDING if self.account is not None and sender else OUTBOX
        message_id = await self._store(tenant, to, sender, body, reason, status)
        if status == OUTBOX:
            why = "no Twilio credentials" if self.account is None else "no sender number"
            log.warning(
                "text to %s kept in the local outbox (%s); see `switchboard outbox`",
                to,
                why,
                extra={"tenant": tenant, "reason": reason},
            )
            return SendResult(OUTBOX)
        assert self.account is not None
        result = await post_message(
            self._http(), self.account, to=to, from_=sender, body=body, policy=self.policy
        )
        await self._record(tenant, message_id, result)
        if result.status == DEAD_LETTER:
            log.error(
                "text to %s not sent after %d attempt(s) (%s): kept as a dead letter",
                to,
                result.attempts,
                result.error_code,
                extra={"tenant": tenant, "reason": reason},
            )
        return result

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def _store(
        self, tenant: str, to: str, sender: str, body: str, reason: str, status: str
    ) -> int:
        async with tenant_session(self.db, tenant) as session:
            message = Message(
                direction="outbound",
                from_number=sender or "-",
                to_number=to,
                body=body[:MAX_BODY_CHARS],
                status=status,
                conversation_id=f"sms:{tenant}:{to}",
                reason=reason[:32],
            )
            session.add(message)
            await session.commit()
            return message.id

    async def _record(self, tenant: str, message_id: int, result: SendResult) -> None:
        async with tenant_session(self.db, tenant) as session:
            message = await session.get(Message, message_id)
            if message is None:
                return
            message.status = result.status
            message.message_sid = result.sid or message.message_sid
            message.error_code = result.error_code
            await session.commit()


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    tenant: str
    created_at: datetime
    to: str
    from_number: str
    status: str
    reason: str | None
    error_code: str | None
    body: str


async def unsent_messages(
    db: async_sessionmaker[AsyncSession], *, limit: int = 100
) -> list[OutboxEntry]:
    """Outbound texts that did not reach Twilio (outbox, still sending, dead letters), newest
    first, across tenants (an operator's view, for `switchboard outbox`)."""
    async with db() as session:
        rows = await session.scalars(
            select(Message)
            .where(Message.direction == "outbound", Message.status.in_(UNSENT))
            .order_by(Message.id.desc())
            .limit(limit)
        )
        return [
            OutboxEntry(
                tenant=m.tenant,
                created_at=m.created_at,
                to=m.to_number,
                from_number=m.from_number,
                status=m.status or "",
                reason=m.reason,
                error_code=m.error_code,
                body=m.body,
            )
            for m in rows
        ]
