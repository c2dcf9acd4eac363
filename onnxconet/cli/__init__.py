"""The command line: a typer app (`cli/app.py`) whose commands (`cli/{inspect,prune,profile,search}.py`) parse
options, call `onnxconet.commands`, and print. Imports go one way: this package -> commands -> the library."""

from onnxconet.cli import agent, inspect, profile, prune, search, worker  # noqa: F401  (each registers its command on the app)
from onnxconet.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
