"""Exporting trained lattn models: ONNX (run with onnxruntime) and torch.export programs.

:func:`export_command` is ``lattn export``; :func:`export_model` exports a task object; the wrappers
(:mod:`lattn_app.export.wrappers`) define what each task's exported file takes and returns. Users'
documentation: docs/export.md.
"""

from .command import FORMATS, METADATA_FILE, TOLERANCE, build_task, export_command, export_model
from .wrappers import ExportWrapper, export_wrapper

__all__ = ["FORMATS", "METADATA_FILE", "TOLERANCE", "ExportWrapper", "build_task", "export_command", "export_model",
           "export_wrapper"]
