"""`python -m server` is the `hookledger` command."""

from server.cli import main

main()
