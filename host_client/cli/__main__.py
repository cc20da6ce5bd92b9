"""`python -m host_client.cli` runs coworkctl."""

from . import main

main()
