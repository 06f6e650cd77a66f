"""``python bench/report.py RESULTS.json [--out PREFIX] [--no-plot]``: the same as
``spm-rt bench report`` (the logic lives in ``spm_rt/bench_commands.py`` so the installed console
script has it too)."""
from __future__ import annotations

import argparse
import sys

from spm_rt.bench_commands import add_subcommands, write_report  # noqa: F401  (re-exported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py")
    sub = parser.add_subparsers(dest="command")
    add_subcommands(sub)
    args = parser.parse_args(["bench", "report", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
