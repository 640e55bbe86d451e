"""`python -m medrpn` is the `medrpn` command."""

from medrpn.cli import main

main()
