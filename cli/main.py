"""The `flashops` command: the composition root that wires each subsystem's command group."""
import sys


def main() -> None:
    from flashops.cli.app import app

    sys.exit(app())
