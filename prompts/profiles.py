"""Business profiles: who answers which number, as whom, with what to say.

A profile is a tenant. Profiles live in a TOML file (`PROFILES_FILE`); the demo file next to
this module ships with the project and is used when none is configured.
"""

from __future__ import annotations

import tomllib
from datetime import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

Persona = Literal["dispatcher", "receptionist", "crm_operator", "field_assistant", "outbound_sdr"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]

DEMO_PROFILES_FILE = Path(__file__).with_name("demo_profiles.toml")


class OpeningHours(BaseModel):
    opens: time
    closes: time


class Escalation(BaseModel):
    budget_limit: float = Field(2000.0, description="Budgets above this escalate to the owner.")
    notify_owner: bool = True
    lead_summary_text: bool = Field(True, description="Text the owner a summary after a lead call.")
    webhook_url: str | None = Field(None, description="Lead webhook (Make.com/Zapier style).")


class BusinessProfile(BaseModel):
    id: str = Field(description="Tenant key; every CRM row belongs to one profile.")
    name: str
    numbers: list[str] = Field(description="E.164 numbers this profile answers (calls and texts).")
    persona: Persona = "dispatcher"
    trade: str = "home services"
    service_area: str = ""
    address: str = ""
    timezone: str = "America/New_York"
    hours: dict[Weekday, OpeningHours] = Field(default_factory=dict)
    appointment_minutes: int = 60
    owner_name: str = "the owner"
    owner_numbers: list[str] = Field(default_factory=list)
    operator_pin: str | None = Field(None, description="DTMF PIN that unlocks the CRM operator.")
    photo_upload_url: str = ""
    greeting: str = ""
    escalation: Escalation = Field(default_factory=Escalation)

    @field_validator("operator_pin")
    @classmethod
    def _pin_is_digits(cls, pin: str | None) -> str | None:
        if pin is not None and not (pin.isdigit() and 4 <= len(pin) <= 12):
            raise ValueError("operator_pin must be 4 to 12 digits")
        return pin


class ProfileBook(BaseModel):
    """All profiles, looked up by tenant id or by a dialled number."""

    profiles: list[BusinessProfile]

    def by_id(self, profile_id: str) -> BusinessProfile | None:
        return next((p for p in self.profiles if p.id == profile_id), None)

    def for_number(self, number: str) -> BusinessProfile | None:
        return next((p for p in self.profiles if number in p.numbers), None)

    @property
    def default(self) -> BusinessProfile:
        return self.profiles[0]


def load_profiles(path: Path | None = None) -> ProfileBook:
    """Read profiles from a TOML file with one `[[profile]]` table each."""
    path = path or DEMO_PROFILES_FILE
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    book = ProfileBook(profiles=data.get("profile", []))
    if not book.profiles:
        raise ValueError(f"{path}: no [[profile]] tables")
    ids = [p.id for p in book.profiles]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: profile ids must be unique")
    numbers = [n for p in book.profiles for n in p.numbers]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{path}: a number is claimed by two profiles")
    return book
