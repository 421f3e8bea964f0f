"""`python -m edgectl` runs the CLI."""

from edgectl.cli import main

main()
