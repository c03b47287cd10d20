"""`lattn bench`: measured cost of the attention mechanisms, the backbones, and the papers' memory claims.

    lattn bench attention [--quick]     # every mechanism vs fused/materialised softmax, over N
    lattn bench crossover --from FILE   # from which N each mechanism beats fused softmax (saved results)
    lattn bench timm      [--quick]     # lattn's softmax ViT against timm's, same weights (time, memory)
    lattn bench backbone  [--quick]     # images/s, peak memory, params, GMACs per backbone x attention
    lattn bench claims    [--quick]     # the papers' memory claims as ratios measured here
    lattn bench export    [--quick]     # exported ONNX models in onnxruntime against eager PyTorch
    lattn bench stereo    [--quick]     # the main job's training step against the previous main job's
    lattn bench compile   [--quick]     # torch.compile against eager: every mechanism, the quickstart networks

Each writes a Markdown table, JSON and CSV (and, for attention, log-log PNG plots) to its ``--output``
folder. See BENCHMARKS.md for results and how they are measured (:mod:`lattn_app.bench.measure`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

SUBCOMMANDS = {
    "attention": "every attention mechanism against fused and materialised softmax attention, over N",
    "crossover": "from which N each mechanism is faster / leaner than fused softmax, from a saved attention JSON",
    "timm": "lattn's softmax ViT-Ti/S against timm's with the same weights, side by side",
    "backbone": "images/s, peak memory, parameters and GMACs of backbones with each attention",
    "claims": "the papers' memory claims, as ratios measured on this machine",
    "export": "latency of the quickstart networks exported to ONNX (onnxruntime) against eager PyTorch",
    "stereo": "the main job's training step against the previous main job's (trilinear, 3 hourglasses), side by side",
    "compile": "torch.compile against eager PyTorch: graph breaks, compile time, inference and training speed",
}


def bench_command(argv: Sequence[str]) -> None:
    """Dispatch `lattn bench <subcommand> ...` (each subcommand has its own --help)."""
    argv = list(argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(
            prog="lattn bench",
            description="Benchmarks of lattn. Subcommands: "
            + "; ".join(f"{name}: {what}" for name, what in SUBCOMMANDS.items())
            + ". `lattn bench SUBCOMMAND --help` lists each one's options.",
        )
        parser.add_argument("subcommand", choices=list(SUBCOMMANDS))
        parser.parse_args(argv[:1])  # prints the help or the error and exits
        return
    if argv[0] == "attention":
        from .attention import main
    elif argv[0] == "crossover":
        from .crossover import main
    elif argv[0] == "timm":
        from .timm_parity import main
    elif argv[0] == "backbone":
        from .backbone import main
    elif argv[0] == "export":
        from .export_latency import main
    elif argv[0] == "stereo":
        from .stereo_step import main
    elif argv[0] == "compile":
        from .compiled import main
    else:
        from .claims import main
    main(argv[1:])


__all__ = ["bench_command"]
