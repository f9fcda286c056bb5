"""Persona system prompts: markdown templates filled in from a business profile.

Each persona is `templates/<persona>.md`; files starting with `_` are shared passages (how to
speak on the phone, the confirmation rule) that personas pull in as `$voice_rules` and
`$confirmation_rules`. Templates use `string.Template` (`$name`): a placeholder with no value
is an error at render time, never a literal "$name" sent to the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime, time
from functools import cache
from pathlib import Path
from string import Template
from typing import get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prompts.profiles import BusinessProfile, OpeningHours, Persona, Weekday

TEMPLATES_DIR = Path(__file__).with_name("templates")
PERSONAS: tuple[str, ...] = get_args(Persona)
PARTIALS = {"voice_rules": "_voice_rules.md", "confirmation_rules": "_confirmation_rules.md"}

_WEEKDAYS: tuple[Weekday, ...] = get_args(Weekday)
_DAY_NAMES = {
    "mon": "Monday",
    "tue": "Tuesday",
    "wed": "Wednesday",
    "thu": "Thursday",
    "fri": "Friday",
    "sat": "Saturday",
    "sun": "Sunday",
}


def render_instructions(
    persona: str, profile: BusinessProfile, *, today: date | None = None
) -> str:
    """The system prompt for `persona` answering for `profile`.

    `today` defaults to the current date in the profile's time zone, so "tomorrow" means the
    caller's tomorrow.
    """
    if persona not in PERSONAS:
        raise ValueError(f"unknown persona {persona!r}; choose one of: {', '.join(PERSONAS)}")
    values = profile_values(profile, today=today or local_today(profile.timezone))
    for key, filename in PARTIALS.items():
        values[key] = _template(filename).substitute(values).strip()
    text = _template(f"{persona}.md").substitute(values)
    return text.strip() + "\n"


def profile_values(profile: BusinessProfile, *, today: date) -> dict[str, str]:
    """Everything a template may mention, as text ready to be spoken or read by the model."""
    notify = profile.escalation.notify_owner
    return {
        "business_name": profile.name,
        "trade": profile.trade,
        "service_area": profile.service_area or "the local area",
        "address_sentence": (
            f"The business is at {profile.address}."
            if profile.address
            else "The business has no public address to give out."
        ),
        "owner_name": profile.owner_name,
        "business_number": spoken_number(profile.numbers[0]) if profile.numbers else "",
        "business_number_sentence": (
            f"The business's phone number is {spoken_number(profile.numbers[0])}."
            if profile.numbers
            else "Do not give out a phone number; say the team will call back."
        ),
        "hours": spoken_hours(profile.hours),
        "timezone": profile.timezone,
        "today": f"{today:%A}, {today:%B} {today.day}, {today.year} ({today.isoformat()})",
        "appointment_minutes": str(profile.appointment_minutes),
        "budget_limit": f"${profile.escalation.budget_limit:,.0f}",
        "escalation_promise": (
            f"{profile.owner_name} gets a text right away and will call them back"
            if notify
            else f"the team will pass it to {profile.owner_name}, who will call them back"
        ),
        "greeting": profile.greeting or f"Thanks for calling {profile.name}, how can I help?",
        "photos_sentence": (
            "When photos would help the team understand or price the job, offer to text the "
            "caller a link to upload them, and use request_photos if they agree."
            if profile.photo_upload_url
            else "There is no photo upload link for this business, so ask the caller to "
            "describe what they see instead."
        ),
    }


def spoken_hours(hours: dict[Weekday, OpeningHours]) -> str:
    """Opening hours as one spoken sentence, runs of days with equal hours grouped."""
    if not hours:
        return "Opening hours are not on file: do not promise times, offer a callback instead."
    parts: list[str] = []
    closed: list[str] = []
    for days, slot in _runs(hours):
        if slot is None:
            closed += [_DAY_NAMES[d] for d in days]
            continue
        span = _DAY_NAMES[days[0]] if len(days) == 1 else _day_range(days)
        parts.append(f"{span} {spoken_time(slot.opens)} to {spoken_time(slot.closes)}")
    sentence = ", ".join(parts)
    if closed:
        sentence += "; closed " + _and_list(closed)
    return sentence + "."


def _runs(
    hours: dict[Weekday, OpeningHours],
) -> Iterable[tuple[list[Weekday], OpeningHours | None]]:
    run: list[Weekday] = []
    current: OpeningHours | None = None
    for day in _WEEKDAYS:
        slot = hours.get(day)
        if run and slot == current:
            run.append(day)
            continue
        if run:
            yield run, current
        run, current = [day], slot
    yield run, current


def _day_range(days: list[Weekday]) -> str:
    if len(days) == 2:
        return f"{_DAY_NAMES[days[0]]} and {_DAY_NAMES[days[1]]}"
    return f"{_DAY_NAMES[days[0]]} to {_DAY_NAMES[days[-1]]}"


def _and_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def spoken_time(moment: time) -> str:
    """8:00 -> "8 AM", 17:30 -> "5:30 PM", 12:00 -> "noon"."""
    if moment == time(12, 0):
        return "noon"
    if moment == time(0, 0):
        return "midnight"
    hour = moment.hour % 12 or 12
    suffix = "AM" if moment.hour < 12 else "PM"
    return f"{hour} {suffix}" if moment.minute == 0 else f"{hour}:{moment.minute:02d} {suffix}"


def spoken_number(e164: str) -> str:
    """A North American E.164 number the way people say it (others unchanged)."""
    digits = e164.removeprefix("+")
    if e164.startswith("+1") and len(digits) == 11 and digits.isdigit():
        return f"{digits[1:4]}-{digits[4:7]}-{digits[7:]}"
    return e164


def local_today(timezone: str) -> date:
    try:
        return datetime.now(ZoneInfo(timezone)).date()
    except (ZoneInfoNotFoundError, ValueError):
        return date.today()


@cache
def _template(filename: str) -> Template:
    return Template((TEMPLATES_DIR / filename).read_text(encoding="utf-8"))
