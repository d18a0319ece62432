"""`python -m sret` runs the command-line tool (also under torchrun)."""

from sret.cli import main

if __name__ == "__main__":
    main()
