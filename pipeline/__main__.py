"""`python -m pipeline`: the same as the `wanbatch` command."""

from pipeline.cli.app import main

main()
