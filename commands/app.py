"""The `itune` command line: each module below registers its commands on the one Typer app."""

from __future__ import annotations

from commands import changes, models, running, server  # noqa: F401 (importing a module registers its commands)
from commands.base import app


def main() -> None:  # pragma: no cover - console script indirection for `python -m commands.app`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
