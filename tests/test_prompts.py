"""Persona prompts: every persona renders for every demo profile, with the profile's facts."""

from __future__ import annotations

import re
from datetime import date, time

import pytest

from prompts.personas import (
    PERSONAS,
    TEMPLATES_DIR,
    render_instructions,
    spoken_hours,
    spoken_number,
    spoken_time,
)
from prompts.profiles import BusinessProfile, OpeningHours, load_profiles

DEMO = load_profiles().profiles
TODAY = date(2026, 3, 5)  # a Thursday
UNFILLED = re.compile(r"\$\{?[A-Za-z_]")


@pytest.fixture(params=DEMO, ids=lambda p: p.id)
def profile(request: pytest.FixtureRequest) -> BusinessProfile:
    return request.param


@pytest.mark.parametrize("persona", PERSONAS)
def test_every_persona_renders_with_the_profiles_facts(
    persona: str, profile: BusinessProfile
) -> None:
    text = render_instructions(persona, profile, today=TODAY)
    assert not UNFILLED.search(text), UNFILLED.search(text)
    assert profile.name in text
    assert profile.owner_name in text
    assert "Thursday, March 5, 2026 (2026-03-05)" in text
    assert profile.timezone in text
    assert spoken_hours(profile.hours) in text
    # The confirmation rule and the phone manner are part of every persona.
    assert "confirmation_required" in text and "confirm_action" in text
    assert "cancel_action" in text and '"executed"' in text
    assert "one question at a time" in text.lower()


def test_demo_profiles_cover_distinct_facts() -> None:
    # Guards the test above: it only proves something if the profiles differ.
    assert len(DEMO) >= 2
    assert len({p.name for p in DEMO}) == len({p.owner_name for p in DEMO}) == len(DEMO)


def test_dispatcher_carries_the_escalation_matrix(profile: BusinessProfile) -> None:
    text = render_instructions("dispatcher", profile, today=TODAY)
    assert f"${profile.escalation.budget_limit:,.0f}" in text
    assert profile.service_area in text
    for category in (
        "budget_over_limit",
        "full_remodel",
        "angry_customer",
        "asked_for_owner",
        "complex_electrical",
        "complex_plumbing",
        "emergency",
    ):
        assert category in text
    for asked_for in ("address", "urgen", "name", "callback number"):
        assert asked_for in text
    assert "capture_lead" in text and "escalate" in text and "end_call" in text


def test_receptionist_knows_the_appointment_length_and_number() -> None:
    dental = next(p for p in DEMO if p.id == "bright-smiles")
    text = render_instructions("receptionist", dental, today=TODAY)
    assert "30 minutes" in text
    assert "500-555-0007" in text
    assert dental.address in text
    assert "check_availability" in text and "book_appointment" in text


def test_profile_options_change_the_text() -> None:
    base = DEMO[0]
    quiet = base.model_copy(
        update={
            "photo_upload_url": "",
            "escalation": base.escalation.model_copy(update={"notify_owner": False}),
            "service_area": "",
            "address": "",
            "greeting": "",
        }
    )
    loud = render_instructions("dispatcher", base, today=TODAY)
    text = render_instructions("dispatcher", quiet, today=TODAY)
    assert "request_photos" in loud and "request_photos" not in text
    assert "gets a text right away" in loud and "gets a text right away" not in text
    assert "the local area" in text
    assert "no public address" in text
    assert f"Thanks for calling {base.name}" in text
    assert not UNFILLED.search(text)


def test_today_defaults_to_the_profiles_local_date(profile: BusinessProfile) -> None:
    text = render_instructions("crm_operator", profile)
    assert re.search(r"\(\d{4}-\d{2}-\d{2}\)", text)


def test_unknown_persona_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown persona"):
        render_instructions("pirate", DEMO[0])


def test_every_template_file_is_a_persona_or_a_shared_passage() -> None:
    names = {path.stem for path in TEMPLATES_DIR.glob("*.md")}
    assert {n for n in names if not n.startswith("_")} == set(PERSONAS)


def test_a_dollar_sign_in_profile_text_is_not_a_placeholder() -> None:
    odd = DEMO[0].model_copy(update={"name": "$ave More ${name} Plumbing"})
    text = render_instructions("dispatcher", odd, today=TODAY)
    assert "$ave More ${name} Plumbing" in text


def test_spoken_hours_groups_days_and_names_closed_ones() -> None:
    nine_to_five = OpeningHours(opens=time(9), closes=time(17))
    hours = {
        "mon": nine_to_five,
        "tue": nine_to_five,
        "wed": nine_to_five,
        "thu": OpeningHours(opens=time(12), closes=time(20, 30)),
        "sat": OpeningHours(opens=time(0), closes=time(12)),
    }
    assert spoken_hours(hours) == (
        "Monday to Wednesday 9 AM to 5 PM, Thursday noon to 8:30 PM, "
        "Saturday midnight to noon; closed Friday and Sunday."
    )
    assert "not on file" in spoken_hours({})


@pytest.mark.parametrize(
    ("moment", "spoken"),
    [(time(8), "8 AM"), (time(17, 30), "5:30 PM"), (time(12), "noon"), (time(0, 15), "12:15 AM")],
)
def test_spoken_time(moment: time, spoken: str) -> None:
    assert spoken_time(moment) == spoken


def test_spoken_number() -> None:
    assert spoken_number("+15005550006") == "500-555-0006"
    assert spoken_number("+442071838750") == "+442071838750"


def test_prompts_import_nothing_of_ours_but_profiles() -> None:
    source = (TEMPLATES_DIR.parent / "personas.py").read_text()
    imports = re.findall(r"^(?:from|import) (\S+)", source, flags=re.MULTILINE)
    ours = {name for name in imports if name.split(".")[0] in {"app", "bridge", "tools", "prompts"}}
    assert ours <= {"prompts.profiles"}


# --- the prompts name only tools and categories that exist ----------------------------------

TOOL_NAME = re.compile(r"\b[a-z]+(?:_[a-z]+)+\b")


@pytest.mark.parametrize("persona", PERSONAS)
def test_persona_text_names_only_tools_it_is_given(persona: str) -> None:
    from tools.registry import REGISTRY, tools_for

    offered = {tool.name for tool in tools_for(persona)}
    own_text = (TEMPLATES_DIR / f"{persona}.md").read_text()
    mentioned = {word for word in TOOL_NAME.findall(own_text) if word in REGISTRY}
    assert mentioned <= offered, f"{persona} mentions tools it does not have: {mentioned - offered}"


def test_shared_confirmation_passage_names_the_real_confirmation_tools() -> None:
    from tools.registry import REGISTRY

    shared = (TEMPLATES_DIR / "_confirmation_rules.md").read_text()
    assert {"confirm_action", "cancel_action"} <= set(TOOL_NAME.findall(shared)) & set(REGISTRY)


@pytest.mark.parametrize("persona", ["dispatcher", "receptionist"])
def test_escalation_categories_in_the_prompt_exist(persona: str) -> None:
    from typing import get_args

    from tools.db.models import EscalationCategory
    from tools.registry import REGISTRY

    text = render_instructions(persona, DEMO[0], today=TODAY)
    # Every other snake_case word a customer-facing prompt uses is an escalation category.
    result_fields = {"confirmation_required", "confirmation_id"}
    categories = set(TOOL_NAME.findall(text)) - set(REGISTRY) - result_fields
    assert categories, "the prompt should name escalation categories"
    assert categories <= set(get_args(EscalationCategory))
