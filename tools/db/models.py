"""The CRM schema: every table the tools read and write, one SQLAlchemy code path for
SQLite and PostgreSQL.

Conventions that the rest of `tools` relies on:

* Every row belongs to a tenant (`tenant` = `BusinessProfile.id`). All models derive from
  `TenantScoped`; query them through `tools.db.tenancy.tenant_session`, which filters and
  stamps the tenant for you.
* Timestamps are timezone-aware UTC `datetime`s on both databases (`UTCDateTime`); naive
  datetimes are refused rather than guessed. Local times are a presentation concern
  (the profile's timezone).
* Closed vocabularies are `Literal` aliases (reuse them in pydantic args models) stored as
  plain strings with a CHECK constraint, so both databases accept the same values and adding
  one is an ordinary migration.
* Foreign keys are plain integer ids; `tenant_session` refuses a reference to another
  tenant's row at flush time.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    Time,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from prompts.profiles import Weekday

# -- vocabularies ------------------------------------------------------------------------

LeadStatus = Literal["new", "contacted", "qualified", "converted"]
LeadSource = Literal["voice", "sms", "web", "referral", "other"]
Urgency = Literal["emergency", "urgent", "routine", "flexible"]
Stage = Literal[
    "new-lead",
    "contacted",
    "discovery-call",
    "proposal-sent",
    "negotiation",
    "closed-won",
    "closed-lost",
]
BookingStatus = Literal["pending", "confirmed", "cancelled"]
PartnershipPhase = Literal["discover", "co-create", "deploy", "independent"]
TaskStatus = Literal["open", "done"]
TaskPriority = Literal["low", "normal", "high", "urgent"]
ActivityKind = Literal[
    "note",
    "door_knock",
    "appointment",
    "inspection",
    "call",
    "sms",
    "email",
    "meeting",
    "status_change",
    "lead_captured",
    "photo_request",
    "photo",
    "escalation",
    "booking",
    "cancellation",
    "task",
    "project_update",
]
ProjectStatus = Literal["planned", "active", "on-hold", "completed", "cancelled"]
Direction = Literal["inbound", "outbound"]
EscalationCategory = Literal[
    "budget_over_limit",
    "full_remodel",
    "angry_customer",
    "asked_for_owner",
    "complex_electrical",
    "complex_plumbing",
    "emergency",
    "other",
]

# Twilio call statuses after which nothing more happens on a call.
TERMINAL_CALL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def choice(vocabulary: Any, name: str) -> Enum:
    """A string column restricted to a Literal's values by a named CHECK constraint."""
    values = get_args(vocabulary)
    return Enum(
        *values,
        name=name,
        native_enum=False,
        create_constraint=True,
        validate_strings=True,
        length=max(len(v) for v in values),
    )


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on PostgreSQL, ISO text on SQLite; always aware UTC in Python.

    SQLite keeps no offset, so values are normalised to UTC on the way in and marked UTC on
    the way out; a naive datetime is a bug (whose local time?) and raises.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# 64-bit ids on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
Id = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[dict[str, Any]]: JSON(),
        list[str]: JSON(),
    }


class TenantScoped(Base):
    """Every CRM row: an id and the tenant (business profile) it belongs to."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(Id, primary_key=True, sort_order=-2)
    tenant: Mapped[str] = mapped_column(String(64), index=True, sort_order=-1)


def _fk(target: str) -> Any:
    # Deleting a parent must not delete history; it just forgets the link.
    return ForeignKey(target, ondelete="SET NULL")


def _pct(column: str) -> CheckConstraint:
    return CheckConstraint(f"{column} >= 0 AND {column} <= 100", name=f"{column}_range")


# -- people and pipeline -----------------------------------------------------------------


class Lead(TenantScoped):
    __tablename__ = "leads"
    __table_args__ = (
        _pct("score"),
        Index(None, "tenant", "status"),
        Index(None, "tenant", "phone"),
    )

    name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(254))
    job_type: Mapped[str | None] = mapped_column(String(200))
    address: Mapped[str | None] = mapped_column(String(500))
    urgency: Mapped[str] = mapped_column(choice(Urgency, "urgency"), default="routine")
    status: Mapped[str] = mapped_column(choice(LeadStatus, "lead_status"), default="new")
    score: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(choice(LeadSource, "lead_source"), default="voice")
    notes: Mapped[str | None] = mapped_column(Text)
    photos: Mapped[list[str]] = mapped_column(default=list)
    # The call (CallSid) or text thread that produced the lead, for tracing back.
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Company(TenantScoped):
    __tablename__ = "companies"

    name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(32))
    website: Mapped[str | None] = mapped_column(String(500))
    address: Mapped[str | None] = mapped_column(String(500))
    industry: Mapped[str | None] = mapped_column(String(100))
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Contact(TenantScoped):
    __tablename__ = "contacts"
    __table_args__ = (Index(None, "tenant", "phone"),)

    name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str | None] = mapped_column(String(32))
    email: Mapped[str | None] = mapped_column(String(254))
    role: Mapped[str | None] = mapped_column(String(100))
    company_id: Mapped[int | None] = mapped_column(_fk("companies.id"), index=True)
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"))
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    company: Mapped[Company | None] = relationship(lazy="joined")


class Opportunity(TenantScoped):
    __tablename__ = "opportunities"
    __table_args__ = (Index(None, "tenant", "stage"),)

    title: Mapped[str] = mapped_column(String(200))
    value: Mapped[Decimal] = mapped_column(Numeric(12, 2), default=Decimal("0"))
    stage: Mapped[str] = mapped_column(choice(Stage, "stage"), default="new-lead")
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"), index=True)
    company_id: Mapped[int | None] = mapped_column(_fk("companies.id"), index=True)
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"))
    expected_close: Mapped[date | None] = mapped_column(Date)
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column()

    contact: Mapped[Contact | None] = relationship(lazy="joined")
    company: Mapped[Company | None] = relationship(lazy="joined")


class Partnership(TenantScoped):
    __tablename__ = "partnerships"
    __table_args__ = (_pct("health_score"),)

    name: Mapped[str] = mapped_column(String(200))
    phase: Mapped[str] = mapped_column(
        choice(PartnershipPhase, "partnership_phase"), default="discover"
    )
    health_score: Mapped[int] = mapped_column(Integer, default=50)
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"))
    company_id: Mapped[int | None] = mapped_column(_fk("companies.id"))
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# -- work --------------------------------------------------------------------------------


class Project(TenantScoped):
    __tablename__ = "projects"
    __table_args__ = (_pct("progress"),)

    name: Mapped[str] = mapped_column(String(200))
    customer: Mapped[str | None] = mapped_column(String(200))
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"))
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"))
    address: Mapped[str | None] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(choice(ProjectStatus, "project_status"), default="planned")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    next_step: Mapped[str | None] = mapped_column(String(500))
    crew: Mapped[list[str]] = mapped_column(default=list)
    start_date: Mapped[date | None] = mapped_column(Date)
    target_date: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Task(TenantScoped):
    __tablename__ = "tasks"
    __table_args__ = (Index(None, "tenant", "status", "due"),)

    title: Mapped[str] = mapped_column(String(300))
    due: Mapped[datetime | None] = mapped_column()
    status: Mapped[str] = mapped_column(choice(TaskStatus, "task_status"), default="open")
    priority: Mapped[str] = mapped_column(choice(TaskPriority, "task_priority"), default="normal")
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"))
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"))
    opportunity_id: Mapped[int | None] = mapped_column(_fk("opportunities.id"))
    project_id: Mapped[int | None] = mapped_column(_fk("projects.id"))
    partnership_id: Mapped[int | None] = mapped_column(_fk("partnerships.id"))
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column()


class Activity(TenantScoped):
    """The timeline: anything that happened to a lead, contact, project or deal."""

    __tablename__ = "activities"
    __table_args__ = (Index(None, "tenant", "at"),)

    kind: Mapped[str] = mapped_column(choice(ActivityKind, "activity_kind"))
    body: Mapped[str] = mapped_column(Text, default="")
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"), index=True)
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"), index=True)
    project_id: Mapped[int | None] = mapped_column(_fk("projects.id"), index=True)
    opportunity_id: Mapped[int | None] = mapped_column(_fk("opportunities.id"))
    booking_id: Mapped[int | None] = mapped_column(_fk("bookings.id"))
    # Who did it: "ai:dispatcher", "owner", a phone number...
    actor: Mapped[str] = mapped_column(String(100), default="system")
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)


# -- calendar ----------------------------------------------------------------------------


class Booking(TenantScoped):
    __tablename__ = "bookings"
    __table_args__ = (
        CheckConstraint("ends_at > starts_at", name="ends_after_start"),
        Index(None, "tenant", "starts_at"),
        Index(None, "tenant", "customer_phone"),
    )

    customer_name: Mapped[str] = mapped_column(String(200))
    customer_phone: Mapped[str | None] = mapped_column(String(32))
    service: Mapped[str] = mapped_column(String(200))
    starts_at: Mapped[datetime] = mapped_column()
    ends_at: Mapped[datetime] = mapped_column()
    status: Mapped[str] = mapped_column(choice(BookingStatus, "booking_status"), default="pending")
    notes: Mapped[str | None] = mapped_column(Text)
    lead_id: Mapped[int | None] = mapped_column(_fk("leads.id"))
    contact_id: Mapped[int | None] = mapped_column(_fk("contacts.id"))
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column()


class BlockedDate(TenantScoped):
    """A whole local day on which nothing can be booked (holiday, vacation)."""

    __tablename__ = "blocked_dates"
    __table_args__ = (UniqueConstraint("tenant", "date"),)

    date: Mapped[date] = mapped_column(Date)
    reason: Mapped[str | None] = mapped_column(String(200))


class AvailabilityRule(TenantScoped):
    """Bookable window on a weekday, in the profile's local time.

    When a weekday has any rules they replace the profile's opening hours for booking on that
    day (several rules make several windows, e.g. around a lunch break).
    """

    __tablename__ = "availability_rules"
    __table_args__ = (CheckConstraint("closes > opens", name="closes_after_opens"),)

    weekday: Mapped[str] = mapped_column(choice(Weekday, "weekday"))
    opens: Mapped[time] = mapped_column(Time)
    closes: Mapped[time] = mapped_column(Time)


# -- conversations -----------------------------------------------------------------------


class Call(TenantScoped):
    __tablename__ = "calls"
    __table_args__ = (UniqueConstraint("tenant", "call_sid"), Index(None, "tenant", "started_at"))

    call_sid: Mapped[str] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(choice(Direction, "call_direction"), default="inbound")
    from_number: Mapped[str | None] = mapped_column(String(64))
    to_number: Mapped[str | None] = mapped_column(String(64))
    persona: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    duration_s: Mapped[float | None] = mapped_column(Float)
    # Twilio's CallStatus vocabulary, kept open: a new Twilio value must never fail a write.
    status: Mapped[str | None] = mapped_column(String(32))
    transcript: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    tool_calls: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CallEvent(TenantScoped):
    """One Twilio status callback, stored once (callbacks are retried and arrive out of order).

    `tenant` is nullable: the app resolves it from the callback's To/From number, but a
    callback for a number no profile answers any more is still worth keeping; such rows are
    invisible to every tenant session. CallSids are globally unique at Twilio, so the
    idempotency key does not need the tenant.
    """

    __tablename__ = "call_events"
    __table_args__ = (UniqueConstraint("call_sid", "status", "sequence_number"),)

    tenant: Mapped[str | None] = mapped_column(  # type: ignore[assignment]
        String(64), index=True, sort_order=-1
    )
    call_sid: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    # Twilio's SequenceNumber; -1 when the callback carries none (e.g. stream events).
    sequence_number: Mapped[int] = mapped_column(Integer)
    raw: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class Message(TenantScoped):
    """One text message, either way. `message_sid` is None until Twilio has accepted it."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("message_sid"),
        Index(None, "tenant", "conversation_id", "created_at"),
    )

    message_sid: Mapped[str | None] = mapped_column(String(64))
    direction: Mapped[str] = mapped_column(choice(Direction, "message_direction"))
    from_number: Mapped[str] = mapped_column(String(64))
    to_number: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str | None] = mapped_column(String(32))
    media: Mapped[list[dict[str, Any]]] = mapped_column(default=list)
    # "sms:{tenant}:{customer number}", the same key as ToolContext.conversation_id.
    conversation_id: Mapped[str | None] = mapped_column(String(128))
    # Why we sent it ("reply", "escalation", "photo_link"...); None for inbound.
    reason: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Escalation(TenantScoped):
    """An owner alert; one per (conversation, category) so a caller cannot trigger a flood."""

    __tablename__ = "escalations"
    __table_args__ = (UniqueConstraint("tenant", "conversation_id", "category"),)

    conversation_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(8))
    caller: Mapped[str | None] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(choice(EscalationCategory, "escalation_category"))
    summary: Mapped[str] = mapped_column(Text)
    callback_number: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # None until at least one owner text went out (no notifier, or all sends failed).
    notified_at: Mapped[datetime | None] = mapped_column()


class AuditLog(TenantScoped):
    """Every tool step (proposed, confirmed, executed, refused...). Column names are a
    contract with tools.audit: keep them."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "tenant", "at"), Index(None, "conversation_id"))

    at: Mapped[datetime] = mapped_column(default=utcnow)
    channel: Mapped[str] = mapped_column(String(8))
    conversation_id: Mapped[str] = mapped_column(String(128))
    caller: Mapped[str | None] = mapped_column(String(64))
    tool: Mapped[str] = mapped_column(String(64))
    arguments: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    confirmation_id: Mapped[str | None] = mapped_column(String(64), index=True)
