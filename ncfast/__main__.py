"""``python -m ncfast``: the command line (as ``torchrun -m ncfast train ...`` needs)."""

from ncfast.cli import main

if __name__ == "__main__":
    main(prog_name="ncfast")
