"""The plug-in registry: every attention mechanism and backbone of lattn is found here by name.

lattn's own entries register themselves with a decorator when their module is imported::

    @ATTENTIONS.register("efficient", time="O(N d^2)", memory="O(d^2)")
    class EfficientAttention(QKVAttention): ...

Third-party packages add entries without touching lattn by declaring a Python entry point in the group
``lattn.attention`` or ``lattn.backbones``::

    [project.entry-points."lattn.attention"]
    my_attention = "my_package.attention:MyAttention"

The entry point is loaded the first time a registry is looked up. It may point at a module whose import
registers its entries with the decorator, or at a class, which is then registered under the entry
point's name.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One registered component and what `lattn list` says about it."""

    name: str
    builder: Callable[..., Any]
    description: str
    time: str = ""
    memory: str = ""
    source: str = "lattn"

    # What a token mixer class declares about itself (False for anything else).
    @property
    def rope(self) -> bool:
        """Accepts ``rope=True`` (2D rotary position embedding)."""
        return bool(getattr(self.builder, "supports_rope", False))

    @property
    def cross(self) -> bool:
        """Accepts a ``context`` for cross-attention."""
        return bool(getattr(self.builder, "supports_cross_attention", False))

    @property
    def cross_attention(self) -> str:
        """What `lattn list` says about cross-attention: "yes", "-", or a condition such as "same grid"."""
        if not self.cross:
            return "-"
        return str(getattr(self.builder, "cross_attention_grid", "yes"))

    @property
    def fixed_grid(self) -> bool:
        """Built for one token grid (``grid_size``); other grids are resampled or refused."""
        return bool(getattr(self.builder, "fixed_grid", False))

    def options(self) -> dict[str, inspect.Parameter] | None:
        """The keyword options the builder takes, by name; None: any (it takes ``**kwargs`` it does not forward).

        A class whose ``__init__`` passes ``**kwargs`` on to its base class (as the mechanisms pass the
        common ``num_heads``, ``qkv_bias``, ... to :class:`~lattn_app.attention.base.QKVAttention`) takes its
        own options and its bases' up to the first ``__init__`` without ``**kwargs``.
        """
        return builder_options(self.builder)

    def accepts(self, option: str) -> bool:
        """Whether `option` may be passed to the builder (the one option check of lattn)."""
        options = self.options()
        return options is None or option in options


def _first_docstring_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message lists the names that are."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """A name -> builder map with decorator registration and lazy entry-point plug-ins."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = False

    def register(
        self,
        name: str,
        *,
        description: str | None = None,
        time: str = "",
        memory: str = "",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers a class or factory function under `name`.

        `description` defaults to the first line of the docstring; `time` and `memory` state the
        complexity in the number of tokens N (shown by `lattn list`).
        """

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice: by {self._entries[name].source} "
                    f"and by {builder.__module__}"
                )
            target = builder.func if isinstance(builder, functools.partial) else builder  # presets
            module = getattr(target, "__module__", "") or ""
            self._entries[name] = Entry(
                name=name,
                builder=builder,
                description=description or _first_docstring_line(builder),
                time=time,
                memory=memory,
                source="lattn" if module.startswith("lattn_app") else module.split(".")[0],
            )
            return builder

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry_point in entry_points(group=self.entry_point_group):
            try:
                loaded = entry_point.load()
            except Exception as error:  # a broken plug-in must not take lattn down with it
                log.warning(
                    "Skipping %s plug-in %r (%s): it failed to load: %s",
                    self.kind,
                    entry_point.name,
                    entry_point.value,
                    error,
                )
                continue
            already = any(e.builder is loaded for e in self._entries.values())
            if callable(loaded) and not inspect.ismodule(loaded) and not already:
                self.register(entry_point.name)(loaded)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self._load_plugins()
        return [self._entries[name] for name in sorted(self._entries)]

    def get(self, name: str) -> Entry:
        self._load_plugins()
        if name in self._entries:
            return self._entries[name]
        available = ", ".join(sorted(self._entries)) or "(none)"
        close = difflib.get_close_matches(name, self._entries, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown {self.kind} {name!r}.{hint} Available: {available}.")

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        """Build the entry `name`, checking option names first so a typo gets a helpful error."""
        entry = self.get(name)
        check_options(entry.builder, options, f"{self.kind} {name!r}")
        return entry.builder(*args, **options)

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name in self._entries


def check_choice(what: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return `value` if it is one of `choices`, else raise a ValueError naming `what` and the choices."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}; got {value!r}")
    return value


_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def builder_options(builder: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """See :meth:`Entry.options`."""
    callables = [cls.__init__ for cls in builder.__mro__ if "__init__" in vars(cls)] if inspect.isclass(builder) \
        else [builder]
    accepted: dict[str, inspect.Parameter] = {}
    for function in callables:
        parameters = inspect.signature(function).parameters.values()
        for parameter in parameters:
            if parameter.kind in _NAMED and parameter.name != "self":
                accepted.setdefault(parameter.name, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return accepted
        if function is callables[-1] or not inspect.isclass(builder):
            return None
    return None


def check_options(builder: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """Raise a TypeError naming any option `builder` does not accept, with the closest accepted one."""
    known = builder_options(builder)
    if known is None:
        return
    accepted = list(known)
    for option in options:
        if option not in accepted:
            close = difflib.get_close_matches(option, accepted, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{what} has no option {option!r}.{hint} Accepted options: {', '.join(accepted)}."
            )


ATTENTIONS = Registry("attention mechanism", "lattn.attention")
BACKBONES = Registry("backbone", "lattn.backbones")
