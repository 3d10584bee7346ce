"""`python -m pipeline`: the same as the `wanbatch` command."""

from pipeline.cli import main

main()
