"""The CSV file of ``lattn predict`` for :class:`~lattn_app.tasks.classification.ClassificationTask`."""

from __future__ import annotations

import csv
from pathlib import Path

from .prediction_writer import LattnPredictionWriter

__all__ = ["ClassificationPredictionWriter"]


class ClassificationPredictionWriter(LattnPredictionWriter):
    """Writes the predictions of ``lattn predict`` to ``<output_dir>/<filename>`` as CSV.

    Columns: ``path``, ``class`` (name), ``class_index``, ``probability`` and ``top5``
    (``name:probability`` pairs separated by ``;``, most probable first). With several processes each
    writes its own file (``predictions_rank<r>.csv``). An earlier run's file is not replaced unless
    ``--overwrite true`` (:class:`~lattn_app.tasks.prediction_writer.LattnPredictionWriter`).
    """

    COLUMNS = ("path", "class", "class_index", "probability", "top5")

    def __init__(self, output_dir: str = "predictions", filename: str = "predictions.csv",
                 overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        self.filename = filename
        self.path: Path | None = None
        self.rows = 0

    def _file_name(self, trainer) -> str:
        if trainer.world_size > 1:
            stem = Path(self.filename)
            return f"{stem.stem}_rank{trainer.global_rank}{stem.suffix}"
        return self.filename

    def on_predict_start(self, trainer, pl_module) -> None:
        super().on_predict_start(trainer, pl_module)
        self.path = self.target(self._file_name(trainer))
        with open(self.path, "w", newline="") as file:
            csv.writer(file).writerow(self.COLUMNS)
        self.rows = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with open(self.path, "a", newline="") as file:
            writer = csv.writer(file)
            for item in prediction:
                top = ";".join(f"{entry['class_name']}:{entry['probability']:.4f}" for entry in item["top5"])
                writer.writerow((item["path"], item["class_name"], item["class_index"], f"{item['probability']:.4f}", top))
                self.rows += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        print(f"Predictions of {self.rows} images written to {self.path.resolve()}", flush=True)
