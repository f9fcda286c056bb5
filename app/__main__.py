"""`python -m app` is the `switchboard` command."""

from app.cli import main

main()
