"""The inputs of one point of `lattn bench attention`: a case built for one grid, dtype and device, the
call that is measured, the bytes it must move, and the error of its output against exact attention."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..attention import attention_info, create_attention
from .cases import OPERATIONS, Case, exact_attention_rows
from .measure import tensor_bytes
from .reference import REFERENCES
from .settings import AttentionBenchSettings

ERROR_ROWS = 256  # the error is measured on this many query rows (exact attention of all N is O(N^2))


class Workload:
    """One case built for one grid, dtype and device: its inputs, parameters and a call."""

    def __init__(self, case: Case, hw: tuple[int, int], settings: AttentionBenchSettings,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.case = case
        self.hw = hw
        n = hw[0] * hw[1]
        generator = torch.Generator().manual_seed(settings.seed)
        torch.manual_seed(settings.seed)
        heads = settings.width // settings.head_dim
        self.module: nn.Module | None = None
        if case.kind == "op":
            shape = (settings.batch_size, heads, n, settings.head_dim)
            self.inputs = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3)]
            self.forward = OPERATIONS[case.name].function
        else:
            x = torch.randn(settings.batch_size, n, settings.width, generator=generator)
            if case.kind == "module":
                options = dict(case.options)
                if attention_info(case.name).fixed_grid:
                    options.setdefault("grid_size", hw)
                if case.name == "mixer":
                    options.setdefault("num_prefix_tokens", 0)
                self.module = create_attention(case.name, dim=settings.width, num_heads=heads, **options)
                self.inputs = [x]
                self.forward = lambda x: self.module(x, hw=hw)
            else:
                reference = REFERENCES[case.name]
                self.module = reference.build(settings.width, heads, hw, **reference.options)
                self.inputs = list(self.module.prepare(x, hw))
                self.forward = lambda *args: self.module(*args)
            self.module.to(device, dtype)
            self.inputs = [t.to(device, dtype) for t in self.inputs]
        self.parameters = [] if self.module is None else list(self.module.parameters())
        self.grad_output = torch.randn(self.inputs[0].shape, generator=generator).to(device, dtype)

    def call(self, mode: str) -> Tensor:
        """One forward (without autograd), or one forward and backward pass (after freeing the previous
        pass's gradients, as a training step's ``zero_grad(set_to_none=True)`` does)."""
        if mode == "forward":
            with torch.no_grad():
                return self.forward(*self.inputs)
        self.free_gradients()
        out = self.forward(*self.inputs)
        out.backward(self.grad_output)
        return out

    def free_gradients(self) -> None:
        for tensor in self.inputs + self.parameters:
            tensor.grad = None

    def prepare(self, mode: str) -> None:
        """Inputs that need gradients (and training mode) for the backward pass, none for a forward."""
        training = mode != "forward"
        for tensor in self.inputs:
            tensor.requires_grad_(training)
        if self.module is not None:
            self.module.train(training)

    def output_and_gradient_bytes(self, out: Tensor) -> int:
        """A floor of a call's true peak memory: its output and the gradients its backward pass wrote (all
        allocated by the call and alive at its end); a lower reading means the profiler lost events."""
        grads = [t.grad for t in self.inputs + self.parameters if t.grad is not None]
        return tensor_bytes([out, *grads])

    def essential_bytes(self, mode: str) -> int:
        """Bytes any implementation must move: inputs and weights read, output written (and, with the
        backward pass, the output's gradient read and the inputs' and weights' gradients written)."""
        inputs = tensor_bytes(self.inputs + self.parameters)
        output = tensor_bytes([self.grad_output])
        return inputs + output if mode == "forward" else 2 * (inputs + output)

    def error(self, out: Tensor) -> float | None:
        """Relative error of `out` against the exact attention of this case's q, k, v, on a set of rows."""
        exact = self.case.exact
        if exact is None:
            return None
        n = self.hw[0] * self.hw[1]
        rows = torch.linspace(0, n - 1, min(ERROR_ROWS, n)).round().long().unique().to(out.device)
        with torch.no_grad():
            if self.case.kind == "op":
                expected = exact_attention_rows(*self.inputs, rows, exact)
                got = out[..., rows, :].double()
            else:
                module = copy.deepcopy(self.module).double().eval()
                x = self.inputs[0].double()
                q, k, v = module.project(x, None)
                per_head = exact_attention_rows(q, k, v, rows, exact)
                expected = module.proj(per_head.transpose(1, 2).flatten(2))
                got = out[:, rows].double()
        return float((got - expected).norm() / expected.norm().clamp_min(1e-300))
