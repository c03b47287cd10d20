"""What every ``lattn predict`` writer shares: it never replaces a file unasked.

Lightning's :class:`~lightning.pytorch.callbacks.BasePredictionWriter` leaves file handling to its
subclasses; each of lattn's writers asks :meth:`LattnPredictionWriter.target` for every path it writes,
which refuses a file an earlier run left (unless ``overwrite``, which ``lattn predict --overwrite true``
sets) and a file this run has already written (two inputs that map to one output name).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["LattnPredictionWriter"]


class LattnPredictionWriter(BasePredictionWriter):
    """A prediction writer whose files are never replaced without the user asking for it.

    Args:
        output_dir: the folder written to; the command line names it ``predictions/<config name>``.
        overwrite: let this run replace files an earlier run wrote (``lattn predict --overwrite true``).
        write_interval: Lightning's ``"batch"``, ``"epoch"`` or ``"batch_and_epoch"``.
    """

    def __init__(self, output_dir: str = "predictions", overwrite: bool = False, write_interval: str = "batch") -> None:
        super().__init__(write_interval=write_interval)
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.written_paths: dict[Path, str] = {}  # this run's files -> the input each came from

    def on_predict_start(self, trainer, pl_module) -> None:
        self.written_paths = {}

    def refuse_earlier(self, relative: str | Path) -> None:
        """Raise FileExistsError if ``output_dir / relative`` exists and `overwrite` is not set."""
        path = self.output_dir / relative
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{path} exists (an earlier lattn predict wrote it) and predictions are never "
                                  f"replaced unasked: move or delete {self.output_dir}, or pass --overwrite true")

    def target(self, relative: str | Path, source: str = "") -> Path:
        """The path ``output_dir / relative``, ready to be written (its folder exists).

        Raises:
            FileExistsError: the file exists from an earlier run (and not `overwrite`); nothing of it is lost.
            ValueError: this run has already written the file, for another input (named in the message).
        """
        path = self.output_dir / relative
        if path in self.written_paths:
            earlier = self.written_paths[path]
            raise ValueError(f"two predicted inputs map to {path}: {earlier or 'an earlier one'} and "
                             f"{source or 'another'}; give them different names (without the extension) or folders")
        self.refuse_earlier(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written_paths[path] = source
        return path
