"""The `sentinel` command: one subcommand per process kind, plus tools to look inside a run.

`base` holds the root command and what every subcommand shares; each other module registers
its commands on import, in the order `--help` lists them.
"""

from sentinel.cli.base import app

# isort: off
from sentinel.cli import services, runs, stages, records, sft, usersim  # noqa: F401 (registers)
# isort: on

app.add_typer(usersim.usersim_app, name="usersim")

__all__ = ["app"]
