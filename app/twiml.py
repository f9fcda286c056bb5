"""The TwiML documents Switchboard answers voice webhooks with (built with twilio's helpers).

Pure functions: strings in, XML out. The media stream URL carries no query string (Twilio drops
them); the one-time token travels as a `<Parameter>` and comes back in the stream's `start`.
"""

from __future__ import annotations

from twilio.twiml.voice_response import Connect, VoiceResponse

TOKEN_PARAMETER = "token"

UNKNOWN_NUMBER_MESSAGE = (
    "Sorry, this number is not set up to take calls right now. Please check the number and "
    "try again. Goodbye."
)
BUSY_MESSAGE = (
    "Sorry, all of our lines are busy at the moment. Please call back in a few minutes. Goodbye."
)
UNAVAILABLE_MESSAGE = "Sorry, we can't take your call right now. Please try again later. Goodbye."


def connect_stream(stream_url: str, token: str) -> str:
    """Bridge the call to our media WebSocket; the stream's start message carries `token`."""
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    stream.parameter(name=TOKEN_PARAMETER, value=token)
    response.append(connect)
    return str(response)


def say_and_hang_up(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


def unknown_number() -> str:
    return say_and_hang_up(UNKNOWN_NUMBER_MESSAGE)


def busy() -> str:
    return say_and_hang_up(BUSY_MESSAGE)


def unavailable() -> str:
    return say_and_hang_up(UNAVAILABLE_MESSAGE)
