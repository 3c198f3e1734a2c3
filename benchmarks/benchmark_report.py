"""Shared by the benchmark scripts: every report ends with the command that produced it."""

from __future__ import annotations

import os
import shlex
import sys


def finish_report(lines: list[str], output: str | None) -> None:
    """Append the command line to `lines`, print them, and write them to `output` when given."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    text = "\n".join([*lines, "", f"Command: `{command}`"])
    print(text)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
