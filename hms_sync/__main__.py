"""`python -m hms_sync` is the `hms-sync` command."""

from .cli import main

main()
