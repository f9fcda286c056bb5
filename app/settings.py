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

    log_level: str = "INFO"

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
