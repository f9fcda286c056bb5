"""Every setting Switchboard reads, in one place.

Values come from the environment (or a `.env` file in the working directory); `.env.example`
documents each one. With nothing set the server runs on embedded defaults: an SQLite file,
an in-process Redis stand-in and the local Realtime emulator.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

OPENAI_REALTIME_URL = "wss://api.openai.com/v1/realtime"
OPENAI_BASE_URL = "https://api.openai.com/v1"


class Settings(BaseSettings):
    # Empty values count as unset: `PROFILES_FILE=` in a .env must not mean the current folder.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    # -- the public face ---------------------------------------------------------------
    public_url: str = Field(
        "http://127.0.0.1:8080",
        description="External base URL Twilio uses to reach us; TwiML and signatures use it.",
    )
    host: str = "127.0.0.1"
    port: int = 8080

    # -- OpenAI ------------------------------------------------------------------------
    openai_api_key: SecretStr | None = None
    openai_realtime_url: str = OPENAI_REALTIME_URL
    openai_base_url: str = OPENAI_BASE_URL
    realtime_model: str = "gpt-realtime"
    realtime_voice: str = "marin"
    transcription_model: str = "gpt-4o-mini-transcribe"

    # -- Twilio ------------------------------------------------------------------------
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_api_url: str = "https://api.twilio.com"
    require_ws_signature: bool = Field(
        False,
        description="Refuse media WebSocket upgrades that carry no X-Twilio-Signature "
        "(a present signature is always checked).",
    )

    # -- stores ------------------------------------------------------------------------
    redis_url: str | None = None
    database_url: str = "sqlite+aiosqlite:///./switchboard.db"

    # -- calls -------------------------------------------------------------------------
    audio_mode: Literal["pcm16", "g711"] = "pcm16"
    profiles_file: Path | None = None
    stream_token_ttl_s: int = 120
    start_timeout_s: float = 5.0
    max_frame_bytes: int = 64 * 1024
    max_frames_per_s: int = Field(
        100, description="Media frames per second one stream may send (Twilio sends 50)."
    )
    frame_burst: int = Field(
        1000, description="Frames a stream may send above that rate in a burst (catch-up)."
    )
    max_call_s: int = 3600
    tool_timeout_s: float = 10.0
    confirmation_ttl_s: int = 300
    transcript_wait_s: float = 3.0
    end_call_grace_s: float = 10.0
    max_concurrent_calls: int = Field(
        50, description="Live calls one replica takes; callers beyond it hear a busy message."
    )
    drain_timeout_s: float = Field(
        120.0, description="On SIGTERM, how long to wait for live calls to end before exiting."
    )

    # -- upstream faults (Realtime connect retries, reconnect, session renewal) ------------
    realtime_retry_budget_s: float = Field(
        3.0,
        description="Seconds of retries (with backoff) to open or re-open a Realtime session "
        "before the caller hears an apology and the owner gets a missed-call text.",
    )
    realtime_session_renew_s: float = Field(
        3300.0,
        description="Replace a call's Realtime session at a quiet moment after this many "
        "seconds, before OpenAI's 60-minute cap ends it; 0 turns this off.",
    )

    # -- limits and outages (hostile input, dependency outages) --------------------------
    max_webhook_bytes: int = Field(
        64 * 1024, description="Largest webhook body accepted; larger ones get 413."
    )
    max_calls_per_caller_per_min: int = Field(
        6, description="Calls one caller number may start per minute; more hear a busy message."
    )
    max_sms_per_number_per_min: int = Field(
        10, description="Text messages one number may send us per minute; more are ignored."
    )
    spool_dir: Path = Field(
        Path("spool"),
        description="Directory where call records and leads wait while the database is down.",
    )
    spool_flush_interval_s: float = Field(
        5.0, description="How often spooled records are retried against the database."
    )

    # -- texting and escalation (SMS channel, owner alerts, outbound notifications) -----
    sms_history_ttl_s: int = Field(
        1800, description="An SMS conversation is forgotten this long after its last message."
    )
    sms_history_messages: int = Field(
        40, description="Most chat messages of an SMS conversation sent to the model."
    )
    sms_max_tool_rounds: int = Field(
        5, description="Model turns with tool calls per inbound text before it must answer."
    )
    sms_reply_deadline_s: float = Field(
        8.0,
        description="Answer Twilio's webhook within this; a slower reply goes out by REST.",
    )
    sms_model_fast: str = "gpt-4.1-nano"
    sms_model_standard: str = "gpt-4.1-mini"
    sms_model_reasoning: str = "o4-mini"
    chat_timeout_s: float = Field(20.0, description="Per Chat Completions request, seconds.")
    sms_send_attempts: int = Field(4, description="Tries per outbound text (5xx/timeouts).")
    sms_send_backoff_s: float = Field(0.5, description="First retry delay; doubles each time.")
    twilio_timeout_s: float = Field(10.0, description="Per Twilio REST request, seconds.")
    lead_webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key for the lead webhook's signature header."
    )
    notify_drain_s: float = Field(
        30.0, description="On shutdown, how long queued texts and webhooks may take to finish."
    )

    log_level: str = "INFO"
    log_redact_phone_numbers: bool = Field(
        True, description="Logs show phone numbers by their last four digits only."
    )

    @property
    def uses_openai(self) -> bool:
        return self.openai_api_key is not None

    @property
    def media_stream_url(self) -> str:
        """The wss:// URL Twilio opens for the media stream (paths survive, queries don't)."""
        base = self.public_url.rstrip("/")
        if base.startswith("https://"):
            base = "wss://" + base.removeprefix("https://")
        elif base.startswith("http://"):
            base = "ws://" + base.removeprefix("http://")
        return base + "/media-stream"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
