"""What the command lines of the `lattn bench` subcommands share: a parser with ``--quick``, the options
that set up the machine (``--device``, ``--memory-limit``, ``--threads``, ``--malloc``), and applying them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .measure import machine_description, memory_limit_bytes, resolve_device, retain_freed_memory, set_threads


def benchmark_parser(subcommand: str, description: str, quick_help: str) -> argparse.ArgumentParser:
    """The parser of `lattn bench SUBCOMMAND`, with its ``--quick`` option."""
    parser = argparse.ArgumentParser(prog=f"lattn bench {subcommand}", description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def add_machine_options(parser: argparse.ArgumentParser, capped: str, malloc: bool = True) -> None:
    """--device, --memory-limit (the cap on what one `capped`, e.g. "point", may allocate), --threads and,
    with `malloc`, --malloc (for benchmarks that time calls at large N; see :func:`retain_freed_memory`)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help=f"GiB one {capped} may allocate; beyond it the {capped} is out of memory (default: "
                        "half the available memory on CPU, none on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    if malloc:
        parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                            help="retain (default): glibc keeps freed memory for reuse, as jemalloc/tcmalloc "
                            "do, instead of unmapping every buffer over 32 MB on free; default: glibc as "
                            "configured")


@dataclass(frozen=True)
class Machine:
    """The machine as the options set it up."""

    device: torch.device
    memory_limit_bytes: int | None  # the cap of every measurement (None: none)
    malloc: str | None  # how freed memory is handled, as the results' settings record it (None: no --malloc)

    def settings(self) -> dict[str, Any]:
        """The machine's entries in a results document's settings."""
        values = {"device": str(self.device), "memory_limit_bytes": self.memory_limit_bytes}
        return values if self.malloc is None else {**values, "malloc": self.malloc}


def set_up_machine(options: argparse.Namespace) -> Machine:
    """Apply the machine options of :func:`add_machine_options` to this process: torch's threads, the
    device, the memory cap, and (on CPU, with ``--malloc retain``) glibc keeping freed memory."""
    set_threads(options.threads)
    device = resolve_device(options.device)
    malloc = getattr(options, "malloc", None)
    if malloc is not None:
        retained = malloc == "retain" and device.type == "cpu" and retain_freed_memory()
        malloc = "retain freed memory (mallopt)" if retained else "default"
    return Machine(device, memory_limit_bytes(options.memory_limit, device), malloc)


def results_document(subcommand: str, argv: Sequence[str], machine: Machine, settings: dict[str, Any],
                     started: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document of a run of `lattn bench SUBCOMMAND ARGV` that began at `started`
    (``time.perf_counter()``); `settings` are the subcommand's own, the machine's are added."""
    return {
        "benchmark": subcommand,
        "command": " ".join(["lattn", "bench", subcommand, *argv]),
        "machine": machine_description(machine.device),
        "settings": {**settings, **machine.settings()},
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
