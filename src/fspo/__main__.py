"""`python -m fspo ...` (and `accelerate launch -m fspo ...`): the `fspo` command."""

from fspo.cli import main

if __name__ == "__main__":
    main()
