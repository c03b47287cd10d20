"""The `lattn` command: LightningCLI for fit / validate / test / predict, plus `lattn list`.

    lattn fit --config configs/<task>.yaml          # train (any Trainer/model/data key can be overridden)
    lattn test --config configs/<task>.yaml --ckpt_path <checkpoint>
    lattn list                                       # registered attention mechanisms and backbones

Tests and notebooks call ``main([...])`` with the same words as the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from . import __version__
from .registry import ATTENTIONS, BACKBONES, Registry

DEFAULT_SEED = 42

DESCRIPTION = (
    "lattn trains and evaluates vision models built on memory-efficient attention.\n"
    "Lightning subcommands: fit, validate, test, predict (each takes --config FILE.yaml).\n"
    "lattn's own subcommand: `lattn list` prints every registered attention mechanism and backbone."
)


class LattnCLI(LightningCLI):
    """LightningCLI in subclass mode: YAML names a model/data class by its short name or class_path.

    The run's full config is saved next to its logs (overwriting an earlier one of the same run
    directory), and the seed defaults to a fixed value so two identical commands train identically.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("parser_kwargs", {"prog": "lattn", "version": __version__, "description": DESCRIPTION})
        super().__init__(args=args, **kwargs)


def _print_registry(registry: Registry, title: str) -> None:
    entries = registry.entries()
    print(f"{title} ({len(entries)})")
    if not entries:
        print("  (none registered)")
        return
    rows = [("NAME", "TIME", "MEMORY", "ROPE", "CROSS", "FIXED GRID", "DESCRIPTION")]
    for e in entries:
        yes_no = lambda flag: "yes" if flag else "-"  # noqa: E731
        source = "" if e.source == "lattn" else f" [{e.source}]"
        rows.append((e.name, e.time, e.memory, yes_no(e.rope), yes_no(e.cross), yes_no(e.fixed_grid),
                     e.description + source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def list_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lattn list",
        description="Print the registered attention mechanisms and backbones (plug-ins included), "
        "with a one-line description and their time and memory complexity in the token count N "
        "(d: head size, C: width, m: features or landmarks, k: projected length, h: hidden size).",
    )
    parser.add_argument("what", nargs="?", choices=("all", "attention", "backbones"), default="all")
    options = parser.parse_args(list(argv))
    # Importing the packages registers lattn's own entries.
    from . import attention  # noqa: F401

    if options.what in ("all", "attention"):
        _print_registry(ATTENTIONS, "Attention mechanisms")
    if options.what == "all":
        print()
    if options.what in ("all", "backbones"):
        _print_registry(BACKBONES, "Backbones")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `lattn` and `python -m lattn_app`; `args` defaults to the command line."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "list":
        list_command(argv[1:])
        return
    if not argv:
        argv = args = ["--help"]
    # LightningCLI reads sys.argv itself when args is None (and warns if given both).
    LattnCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
