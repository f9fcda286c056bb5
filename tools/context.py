"""What a tool knows about the conversation that called it.

The bridge (voice) and the SMS engine build one ToolContext per conversation. Every query a
tool makes is scoped by `tenant`; nothing in a context lets a tool reach another tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from prompts.profiles import BusinessProfile
    from tools.conversation import ConversationLog

Channel = Literal["voice", "sms"]


class CallControl(Protocol):
    """What the live call lets tools do to it (implemented by bridge.call.CallSession)."""

    async def hang_up(self) -> None:
        """Let the current goodbye play out, then end the call."""

    async def transfer(self, number: str) -> None:
        """Hand the caller to a human at `number`."""


class Notifier(Protocol):
    """Outbound text messages (owner alerts, photo links); never blocks a live call."""

    async def send_sms(self, tenant: str, to: str, body: str, *, reason: str) -> None: ...


@dataclass(slots=True)
class ToolContext:
    tenant: str
    profile: BusinessProfile
    channel: Channel
    conversation_id: str  # CallSid for calls, "sms:{tenant}:{number}" for texts
    caller: str  # the customer's (or owner's) phone number, E.164
    persona: str
    db: async_sessionmaker[AsyncSession]
    kv: Redis
    conversation: ConversationLog
    call: CallControl | None = None
    notifier: Notifier | None = None
    tool_timeout_s: float = 10.0
    confirmation_ttl_s: int = 300
    transcript_wait_s: float = 3.0
    extra: dict[str, object] = field(default_factory=dict)
