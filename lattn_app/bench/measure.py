"""How lattn's benchmarks measure: time, peak memory, FLOPs, out-of-memory, and the machine's roofline.

- **Time**: warm-up calls, then repeated calls timed with ``time.perf_counter`` (CUDA is synchronised
  before and after each call); the median with the fastest and slowest call as its spread.
- **Peak extra memory**: what one call allocates beyond what existed before it, at its highest point.
  CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``). CPU: PyTorch's profiler
  records every allocation and free of torch's CPU allocator; their running sum, at its maximum, is the
  peak. Both see torch's own allocations (kernels' workspaces included), not the Python heap. The
  profiler now and then loses events, which lowers a reading, and a first call can make one-time
  allocations, which raise it: a CPU call is read until two readings agree (a call allocates the same
  on every repeat), up to CPU_MEMORY_READINGS times, and a reading below the call's output and
  gradients does not count.
- **FLOPs**: ``torch.utils.flop_counter`` (matrix products, convolutions, attention kernels; element-wise
  work such as softmax and exp is not counted), forward and backward.
- **Out of memory** is a result: a call that fails to allocate (CUDA's OutOfMemoryError, CPU's
  "can't allocate memory") is recorded, not raised (:func:`run_capped`). :class:`MemoryCap` limits what a
  call may allocate, on CPU with the data-segment limit of the process (RLIMIT_DATA), so an over-large
  point fails to allocate instead of swapping or waking the kernel's OOM killer; on CUDA with the
  allocator's fraction.
- **Roofline**: the machine's matrix-product FLOP/s and copy bandwidth, measured in the same run, bound
  any operation's time from below by max(FLOPs / FLOP/s, bytes / bandwidth). The attention benchmark
  probes them again at every N and keeps the best reading (a busy machine only lowers a probe).
- **Freed memory** is kept for reuse on CPU (:func:`retain_freed_memory`, as jemalloc or tcmalloc would),
  so that calls at large N do not page-fault fresh buffers every time, also after a point that ran out
  of memory; the calls whose memory is measured allocate from the system again
  (:func:`fresh_allocations`), so that a memory cap binds.
- **Shared machines**: short points are repeated until they have run for a while and the fastest call
  is kept next to the median; lattn's mechanisms and their reference formulations are timed call by
  call in alternation (:func:`time_side_by_side`), and compared by the median of the rounds' time
  ratios (:func:`paired_ratio`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from ..backbones.base import _EXTRA_FLOP_FORMULAS

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- time


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of `repeats` timed calls, and the fastest and slowest of them."""

    median: float
    fastest: float
    slowest: float
    repeats: int
    calls: tuple[float, ...] = ()  # every timed call's seconds, in order (from :func:`time_side_by_side`)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 3,
    budget_seconds: float = math.inf,
    min_seconds: float = 0.0,
    max_calls: int = 200,
) -> Timing:
    """Time `fn` after `warmup` untimed calls: `repeats` calls, fewer (not under `min_repeats`) once the
    timed calls have used up `budget_seconds`, so that slow points stay affordable; more (up to
    `max_calls`) while they took less than `min_seconds` in all, so that the fastest of many short calls
    is not thrown off by a moment's load on a shared machine."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds: list[float] = []
    while len(seconds) < repeats or (sum(seconds) < min_seconds and len(seconds) < max_calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if len(seconds) >= min_repeats and sum(seconds) >= budget_seconds:
            break
    return Timing(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


def time_side_by_side(fns: Sequence[Callable[[], object]], device: torch.device, warmup: int = 1,
                      repeats: int = 5, min_repeats: int = 3, budget_seconds: float = math.inf,
                      min_seconds: float = 0.0, max_rounds: int = 200) -> list[Timing]:
    """Time several calls in alternation: every round calls each of `fns` once, so that a change in the
    load of a shared machine slows all of them alike and their ratio stays true. Every other round calls
    them in reverse order, so that whatever the first call of a round pays for (caches, memory that the
    previous call's frees left to reuse) falls on each of them alike. Short calls get more rounds: they go
    on (up to `max_rounds`) until the timed calls took `min_seconds` in all, so that the fastest call of
    each is not one lucky or unlucky millisecond."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    seconds: list[list[float]] = [[] for _ in fns]
    order = list(zip(fns, seconds))
    rounds = 0
    while rounds < repeats or (sum(map(sum, seconds)) < min_seconds and rounds < max_rounds):
        for fn, times in order if rounds % 2 == 0 else reversed(order):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        rounds += 1
        if rounds >= min_repeats and sum(map(sum, seconds)) >= budget_seconds:
            break
    return [Timing(statistics.median(t), min(t), max(t), len(t), tuple(t)) for t in seconds]


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """The median over the rounds of :func:`time_side_by_side` of the ratio of two calls timed side by
    side: each round's two calls ran moments apart, so a change in load between rounds cancels out, and
    a round in which the load changed between the two calls is outvoted by the others."""
    return statistics.median(a / b for a, b in zip(numerator.calls, denominator.calls, strict=True))


# -------------------------------------------------------------------------------------------- memory


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ library prints start/stop lines on it)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_from_profile(profiler: torch.profiler.profile) -> int | None:
    """Highest running sum of the CPU allocations (+) and frees (-) that the profiler recorded; None when
    it recorded none at all. (Rarely, on very short calls, the profiler loses some of a run's events.)"""
    records = [
        event for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    if not records:
        return None
    records.sort(key=lambda event: event.start_ns())
    running, peak = 0, 0
    for event in records:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """The bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


# The note on a point whose CPU memory reading stayed below its floor (see call_with_peak_memory).
LOST_EVENTS_NOTE = "memory reading incomplete (the profiler lost allocation events)"
CPU_MEMORY_READINGS = 4  # the most calls one CPU memory reading makes (see the module docstring)


def call_with_peak_memory(fn: Callable[[], object], device: torch.device,
                          at_least: Callable[[object], int] | None = None,
                          before_each: Callable[[], None] | None = None) -> tuple[object, int]:
    """Call `fn`; return its result and the peak bytes it allocated beyond those allocated before.
    On CPU its allocations come from the system (:func:`fresh_allocations`), so that a memory cap binds,
    and `fn` is called until two readings agree, at most CPU_MEMORY_READINGS times: one that lost
    events (lower) or made one-time allocations (higher) is outvoted; without agreement the middle
    reading is kept.

    `at_least(result)` is a floor any true peak reaches (e.g. the bytes of a tensor `fn` creates and
    returns): on CPU a lower reading means the profiler lost events, and it does not count.
    `before_each()` runs before every call, outside the reading, so that each reading starts from the
    same state (e.g. no gradients left by the previous call, whose freeing would offset the new ones).
    """
    if before_each is not None:
        before_each()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    complete_readings, peak = [], None
    for attempt in range(CPU_MEMORY_READINGS):
        if attempt and before_each is not None:
            before_each()
        with fresh_allocations(), _quiet_stderr(), \
                torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
            result = fn()
        with _quiet_stderr():
            peak = _cpu_peak_from_profile(profiler)
        if peak is not None and (at_least is None or peak >= at_least(result)):
            if any(math.isclose(peak, earlier, rel_tol=0.01) for earlier in complete_readings):
                return result, peak
            complete_readings.append(peak)
    return result, statistics.median_high(complete_readings) if complete_readings else (peak or 0)


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's error."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message)


def _data_segment_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmData not found in /proc/self/status")


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a run may use: free GPU memory, or the system's MemAvailable (None where unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_limit_bytes(gib: float | None, device: torch.device) -> int | None:
    """The per-point memory cap of `--memory-limit GIB`; unset: half the available memory on a CPU that
    supports the cap, else no cap."""
    if gib is not None:
        return int(gib * 2**30)
    if device.type != "cpu" or not MemoryCap.supported(device):
        return None
    available = available_memory_bytes(device)
    return None if available is None else available // 2


class MemoryCap:
    """While active, allocations beyond `limit_bytes` more than at entry fail as out-of-memory errors.

    CPU (Linux): the soft RLIMIT_DATA of the process is set to its current data segment plus the limit,
    so torch's allocator gets ENOMEM ("can't allocate memory") - the same error as a real shortage.
    CUDA: the allocator's per-process memory fraction. `limit_bytes=None` sets no limit.
    """

    def __init__(self, limit_bytes: int | None, device: torch.device) -> None:
        self.limit_bytes = limit_bytes
        self.device = device
        self._restore: Callable[[], None] | None = None

    @staticmethod
    def supported(device: torch.device) -> bool:
        return device.type == "cuda" or (sys.platform.startswith("linux") and os.path.exists("/proc/self/status"))

    def __enter__(self) -> MemoryCap:
        if self.limit_bytes is None:
            return self
        if not self.supported(self.device):
            raise RuntimeError(f"a memory limit is not supported on {self.device} on this platform")
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            allowed = torch.cuda.memory_allocated(self.device) + self.limit_bytes
            torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), self.device)
            self._restore = lambda: torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        else:
            soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
            cap = _data_segment_bytes() + self.limit_bytes
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
            self._restore = lambda: resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def run_capped(fn: Callable[[], T], limit_bytes: int | None, device: torch.device,
               raise_errors: bool = False) -> tuple[T | None, dict[str, str] | None]:
    """Call `fn` under a :class:`MemoryCap` of `limit_bytes`; returns its result and None, or None and the
    failure as a point's ``status`` and ``note``: "oom" ("out of memory") or "error" (the exception), so
    that one failed point does not stop a benchmark. With `raise_errors`, only running out of memory is
    a result and other errors propagate. After a failure the memory of the failed call is freed."""
    try:
        with MemoryCap(limit_bytes, device):
            return fn(), None
    except Exception as error:
        if is_out_of_memory(error):
            failure = {"status": "oom", "note": "out of memory"}
        elif raise_errors:
            raise
        else:
            failure = {"status": "error", "note": f"{type(error).__name__}: {error}"}
    # Here, after the except block, the traceback and the tensors its frames held are gone.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None, failure


# --------------------------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # The CPU fused-attention backward kernel is unknown to PyTorch's counter (its forward is known to
    # count_complexity's table).
    return sdpa_backward_flop_count(grad_out, query, key, value)


FLOP_FORMULAS = {
    **_EXTRA_FLOP_FORMULAS,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """``with counting_flops() as counter: ...`` then ``counter.get_total_flops()``."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        yield counter


# ------------------------------------------------------------------------------------------ roofline


@dataclass(frozen=True)
class Roofline:
    """The machine's ceilings for one dtype: matrix-product FLOP/s and copy bandwidth (bytes/s)."""

    dtype: str
    matmul_flops_per_second: float
    copy_bytes_per_second: float
    matmul_size: int
    copy_bytes: int

    def best(self, other: Roofline) -> Roofline:
        """The higher of both ceilings: a busy machine only ever lowers a probe's reading."""
        return Roofline(self.dtype, max(self.matmul_flops_per_second, other.matmul_flops_per_second),
                        max(self.copy_bytes_per_second, other.copy_bytes_per_second), self.matmul_size,
                        self.copy_bytes)

    def minimum_seconds(self, flops: float, num_bytes: float) -> float:
        """The least time an operation of `flops` FLOPs that moves `num_bytes` bytes can take here."""
        return max(flops / self.matmul_flops_per_second, num_bytes / self.copy_bytes_per_second)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_roofline(device: torch.device, dtype: torch.dtype, matmul_size: int | None = None,
                     copy_megabytes: int | None = None, repeats: int = 5) -> Roofline:
    """Probe the best matrix-product FLOP/s (square matmul) and copy bandwidth (read + write) of `device`.

    The copy buffer is larger than the caches (256 MB on CPU, 1 GB on CUDA) so that it measures memory.
    """
    matmul_size = matmul_size or (8192 if device.type == "cuda" else 2048)
    copy_megabytes = copy_megabytes or (1024 if device.type == "cuda" else 256)
    factors = [torch.randn(matmul_size, matmul_size, device=device).to(dtype) for _ in range(2)]
    matmul = time_calls(lambda: factors[0] @ factors[1], device, warmup=1, repeats=repeats)
    factors.clear()  # free them before the copy buffers are allocated
    numel = copy_megabytes * 2**20 // torch.tensor([], dtype=dtype).element_size()
    source = torch.ones(numel, device=device, dtype=dtype)
    target = torch.empty_like(source)
    copy = time_calls(lambda: target.copy_(source), device, warmup=1, repeats=repeats)
    moved = 2 * tensor_bytes([source])  # read once, written once
    return Roofline(
        dtype=str(dtype).removeprefix("torch."),
        matmul_flops_per_second=2 * matmul_size**3 / matmul.fastest,
        copy_bytes_per_second=moved / copy.fastest,
        matmul_size=matmul_size,
        copy_bytes=moved,
    )


# ----------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on (named in every output file)."""
    info: dict[str, object] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    total = available_memory_bytes(torch.device("cpu"))
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None if total is None else round(total / 2**30, 1)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_gb"] = round(properties.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters of <malloc.h>
_RETAIN = {"mmap": 2**30, "trim": 2**31 - 1}
_RELEASE = {"mmap": 128 * 1024, "trim": 128 * 1024}  # glibc's initial values
_libc: object | None = None  # set once freed memory is retained


def _set_malloc(values: dict[str, int]) -> bool:
    assert _libc is not None
    return bool(_libc.mallopt(_M_MMAP_THRESHOLD, values["mmap"])) and bool(
        _libc.mallopt(_M_TRIM_THRESHOLD, values["trim"]))


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, so each
    call at large N page-faults its big buffers anew (several ms per 64 MB here): a cost that jumps in at
    one size and bends every curve upwards there. PyTorch's CPU performance guide recommends an allocator
    that reuses memory (jemalloc, tcmalloc) for this reason; raising the mmap and trim thresholds makes
    glibc do the same. It applies to every case of a run alike; :func:`fresh_allocations` suspends it
    for the calls whose memory is measured under a :class:`MemoryCap`. Returns whether it was applied
    (only on Linux with glibc).

    malloc is also held to one arena: when an allocation fails (a point out of memory under the cap),
    glibc retries it in a new arena and keeps the thread there, and a secondary arena serves every block
    over 64 MB with a fresh mmap again. Every later point of the run then page-faulted its big buffers
    on each call (measured: ~1.35x slower at N=65,536 after one failed allocation)."""
    global _libc
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.mallopt, _libc.malloc_trim  # noqa: B018 (both must exist: glibc)
    except (OSError, AttributeError):
        _libc = None
        return False
    if not _set_malloc(_RETAIN) or not _libc.mallopt(_M_ARENA_MAX, 1):
        _libc = None
        return False
    return True


@contextlib.contextmanager
def fresh_allocations() -> Iterator[None]:
    """While active, big allocations come from the system again (mmap) and frees go back to it, so that
    a :class:`MemoryCap` (which limits the growth of the data segment) sees every one of them, even after
    :func:`retain_freed_memory` has kept freed memory around. A no-op when memory is not retained."""
    if _libc is None:
        yield
        return
    _set_malloc(_RELEASE)
    _libc.malloc_trim(0)
    try:
        yield
    finally:
        _set_malloc(_RETAIN)


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads for torch's kernels (None: torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1; got {threads}")
        torch.set_num_threads(threads)
