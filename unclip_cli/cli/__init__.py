"""Typer commands only: parse options, call a stage, hand results to io.

Each module registers its commands on the shared app; importing this package registers them all.
"""

from unclip_cli.cli import stages, manipulate, model, data, train, evaluate, metrics  # noqa: F401  (registers, in help order)
from unclip_cli.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
