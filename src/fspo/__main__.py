"""`python -m fspo ...` (and `accelerate launch -m fspo ...`): the `fspo` command."""

from fspo.cli import main

main()
