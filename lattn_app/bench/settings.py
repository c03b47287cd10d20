"""What one run of `lattn bench attention` measures and how: its settings, shared by the workloads, the
sweep and the command line."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .cases import Case

# What a point's call does: one forward without autograd, or one forward and backward pass.
MODES = ("forward", "forward+backward")


@dataclass
class AttentionBenchSettings:
    """The points of a run (cases x grid sizes x dtypes x modes), their shapes, and the timing budget."""

    sizes: list[tuple[int, int]]
    dtypes: list[str]
    modes: list[str]
    cases: list[Case]
    device: torch.device
    batch_size: int = 1
    width: int = 256
    head_dim: int = 64
    warmup: int = 1
    repeats: int = 5
    point_seconds: float = 10.0
    max_call_seconds: float = 60.0
    memory_limit_bytes: int | None = None
    seed: int = 0

    @property
    def short_point_seconds(self) -> float:
        """Short points (and pairs) are repeated until their timed calls took this long in all."""
        return min(1.0, self.point_seconds / 4)

    def as_dict(self) -> dict[str, Any]:
        """The settings as the results document records them (sizes as "HxW", cases by label)."""
        values = asdict(self)
        values["sizes"] = [f"{h}x{w}" for h, w in self.sizes]
        values["cases"] = [case.label for case in self.cases]
        values["device"] = str(self.device)
        return values
