"""Entry point `wmtp-operator` (and `python -m wmtp_operator`)."""

import sys


def main() -> None:
    sys.exit("wmtp-operator: the operator is not implemented yet (see the operator issue)")


if __name__ == "__main__":
    main()
