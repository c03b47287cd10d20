"""What `lattn bench attention` measures: its *cases*, and the exact attention each one stands for.

A case is one row of the benchmark:

- a registered mechanism as a module (projections included), or one of the variants
  ``softmax-materialised`` (the N x N map built explicitly: the papers' "regular Transformer"),
  ``efficient-scaling`` (scaling normalisation) and ``care-block`` (CARE's block configuration);
- a bare operation given q, k, v: ``op:softmax-fused`` (``scaled_dot_product_attention``),
  ``op:softmax-materialised``, ``op:efficient`` and ``op:efficient-scaling``;
- a reference formulation of :mod:`lattn_app.bench.reference` (``reference:<mechanism>``).

A case's error is measured against the exact attention it approximates (:func:`exact_attention_rows`):
softmax attention, or dot-product attention for scaling normalisation (docs/methods.md#efficient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..attention import attention_info, list_attentions
from ..attention.base import QKVAttention
from ..attention.efficient import efficient_attention
from .reference import REFERENCES


@dataclass(frozen=True)
class Case:
    """One row of the benchmark: a module, an operation, or a reference formulation."""

    label: str
    kind: str  # "module", "op" or "reference"
    name: str  # registry name (module), key of OPERATIONS (op) or of REFERENCES (reference)
    options: dict[str, Any] = field(default_factory=dict)
    exact: str | None = "softmax"  # the exact attention its error is measured against (None: not one)


@dataclass(frozen=True)
class Operation:
    """A bare attention operation on q, k, v of shape (B, heads, N, d), and the exact attention it computes
    or approximates."""

    function: Callable[[Tensor, Tensor, Tensor], Tensor]
    exact: str


def _materialised_softmax(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention with its N x N map built explicitly."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


OPERATIONS = {  # in the order of the benchmark's rows
    "softmax-fused": Operation(F.scaled_dot_product_attention, "softmax"),
    "softmax-materialised": Operation(_materialised_softmax, "softmax"),
    "efficient": Operation(efficient_attention, "softmax"),
    "efficient-scaling": Operation(lambda q, k, v: efficient_attention(q, k, v, normalization="scaling"),
                                   "dot-product"),
}
MODULE_VARIANTS = (
    Case("softmax-materialised", "module", "softmax", {"fused": False}),
    Case("efficient-scaling", "module", "efficient", {"normalization": "scaling"}, exact="dot-product"),
    Case("care-block", "module", "care", {"value_projection": False, "output_projection": False}),
)


def all_cases() -> list[Case]:
    """Every case: registered mechanisms (plug-ins too), variants, operations, reference formulations."""
    cases = []
    for name in list_attentions():
        builder = attention_info(name).builder
        has_qkv = isinstance(builder, type) and issubclass(builder, QKVAttention)  # fnet, mixer: no q, k, v
        cases.append(Case(name, "module", name, exact="softmax" if has_qkv else None))
    cases += MODULE_VARIANTS
    cases += [Case(f"op:{name}", "op", name, exact=operation.exact) for name, operation in OPERATIONS.items()]
    cases += [Case(f"reference:{key}", "reference", key, exact=None) for key, reference in REFERENCES.items()
              if reference.available]  # a package reference whose package is not installed is left out
    return cases


def select_cases(selection: Sequence[str] | None) -> list[Case]:
    """Cases by label; the words "modules", "ops" and "references" select a whole kind."""
    cases = all_cases()
    if not selection:
        return cases
    kinds = {"modules": "module", "ops": "op", "references": "reference"}
    chosen = []
    for word in selection:
        matches = [c for c in cases if c.label == word or kinds.get(word) == c.kind]
        if not matches:
            raise ValueError(f"unknown case {word!r}; choose from modules, ops, references or "
                             f"{', '.join(c.label for c in cases)}")
        chosen += [c for c in matches if c not in chosen]
    return chosen


def exact_attention_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, exact: str) -> Tensor:
    """Rows `rows` of the exact attention `exact` ("softmax" or "dot-product") in float64, per head:
    (B, h, R, d). One head at a time, so that the R x N scores stay small at large N."""
    out = torch.empty(*q.shape[:-2], len(rows), v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h, rows].double() @ k[b, h].double().T
            if exact == "softmax":
                weights = torch.softmax(scores / q.shape[-1] ** 0.5, dim=-1)
            else:  # dot-product attention, the exact form of efficient attention with scaling normalisation
                weights = scores / k.shape[-2]
            out[b, h] = weights @ v[b, h].double()
    return out
