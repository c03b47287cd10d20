"""Where the embedded synthetic sets live, and how each is written exactly once.

A set is generated into a temporary sibling folder and renamed into place only when complete (its
``README.txt`` is written last and marks a finished set), so a killed generation never leaves a half
set, and concurrent callers (DDP ranks, data-loader workers) each end up using one complete copy.
Temporary folders older than an hour, left by killed generations, are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

README_NAME = "README.txt"
CACHE_VARIABLE = "LATTN_CACHE_DIR"
STALE_TEMPORARY_SECONDS = 3600


def default_cache_dir() -> Path:
    """``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``."""
    configured = os.environ.get(CACHE_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lattn"


def _remove_stale_temporaries(cache_dir: Path, name: str) -> None:
    now = time.time()
    for candidate in cache_dir.glob(f".{name}.tmp-*"):
        try:
            if now - candidate.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                shutil.rmtree(candidate, ignore_errors=True)
        except OSError:
            pass  # another process removed it


def build_once(cache_dir: str | Path | None, name: str, write: Callable[[Path], None], what: str) -> Path:
    """The folder ``cache_dir/name``, made by ``write(folder)`` on the first call and reused afterwards.

    `write` must fill the folder it is given and write ``README.txt`` last; `what` names the set in
    the log ("synthetic Scene Flow set").
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache_dir / name
    if (root / README_NAME).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise RuntimeError(
            f"{root} exists but is not a complete {what} (it has no {README_NAME}); "
            "delete that folder and it will be generated again"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot write the {what} into {cache_dir}: {error.strerror}; set {CACHE_VARIABLE} to a writable "
            "folder",
        ) from None
    _remove_stale_temporaries(cache_dir, name)
    log.info("Generating the %s into %s (done once; later runs reuse it)", what, root)
    started = time.perf_counter()
    try:
        write(temporary)
        os.chmod(temporary, 0o755)  # mkdtemp makes it private to the user
        try:
            os.replace(temporary, root)
        except OSError:
            if not (root / README_NAME).is_file():  # not a concurrent caller that finished first
                raise
            log.info("Another process generated %s at the same time; using its copy", root)
        else:
            log.info("The %s was generated in %.1f s", what, time.perf_counter() - started)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return root
