"""`lattn export`: a trained checkpoint as a self-contained ONNX file or torch.export program.

    lattn export --config configs/sceneflow_efficient.yaml --ckpt_path checkpoints/sceneflow_efficient/best.ckpt \\
        --format onnx --output sceneflow.onnx

The config is parsed by the same parser as ``lattn fit/test`` (``extends:``, overrides such as
``--model.init_args.attention_options.num_features 64``) and builds the model; the checkpoint must fit
it (the check of ``lattn test --ckpt_path``) and gives every weight. What the data determined at
training (``num_classes``, ``class_names``, ``category_ids``, stereo's ``max_disparity``) is read from the
checkpoint, so exporting needs no dataset.

Before anything is written the export is checked: the exported program and (for ONNX) onnxruntime must
reproduce the eager model at the traced size and at a second size it did not see (relative error
<= ``TOLERANCE``). An existing output is never replaced without ``--overwrite true``.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import logging
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..callbacks import write_atomically
from ..cli import LINKED_DATA_ATTRIBUTES, LattnCLI, weights_come_from_checkpoint
from ..tasks import LattnTask
from ..tasks.record import checkpoint_mismatch, describe, read_checkpoint_header, task_name
from .wrappers import PARTS, DetectionExport, ExportWrapper, export_wrapper

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}
METADATA_FILE = "lattn_metadata.json"  # the torch.export program's extra file holding the metadata
OPSET = 18  # ONNX opset: DFT (FNet's transform) since 17; 18 is the dynamo exporter's default
TOLERANCE = 1e-4  # largest relative error (max |exported - eager| / max |eager|) an export may have


class ExportCLI(LattnCLI):
    """LattnCLI's config parsing (no subcommand) with export's options; builds the model and nothing else.

    The datamodule and the trainer are not built: export needs neither, and a dataset that is not on
    this machine must not stop it. The arguments the CLI links from the data are taken from the checkpoint.
    """

    def __init__(self, args: Sequence[str]) -> None:
        super().__init__(args=list(args), run=False, parser_kwargs={"prog": "lattn export", "description": HELP})

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="export: the trained checkpoint (a lattn .ckpt) whose weights are exported.")
        parser.add_argument("--format", type=str | None, default=None,
                            help=f"export: {' or '.join(FORMATS)} (a {FORMATS['onnx']} or {FORMATS['torch_export']} file).")
        parser.add_argument("--output", type=str | None, default=None, help="export: the file to write.")
        parser.add_argument("--image_size", type=list[int] | None, default=None,
                            help="export: [height, width] traced and checked (default: the network's own "
                                 "size, see docs/export.md).")
        parser.add_argument("--part", type=str, default="all",
                            help="export: all (the whole network) or features (DetectionTask: the backbone and "
                                 "feature pyramid only; see docs/export.md).")
        parser.add_argument("--dynamic_size", type=bool, default=True,
                            help="export: let height and width vary (false: fixed at --image_size).")

    def before_instantiate_classes(self) -> None:
        # The one part of LattnCLI's preparation that applies: weights come from the checkpoint.
        weights_come_from_checkpoint(self.config, self.config.get("ckpt_path"))

    def instantiate_classes(self) -> None:
        self.model = None  # built by build_task once the options are checked (export_command)
        self.datamodule = None
        self.trainer = None


HELP = ("Export a trained checkpoint as a self-contained ONNX file (--format onnx, run with onnxruntime) or "
        "torch.export program (--format torch_export, .pt2): images in [0, 1] in, the task's outputs out, its "
        "normalisation inside and its preprocessing in the file's metadata. --config and --ckpt_path as for "
        "`lattn test`. See docs/export.md.")


def build_task(config, ckpt_path: str) -> LattnTask:
    """The task the config describes, with the checkpoint's weights (a one-line error if they do not fit)."""
    header = read_checkpoint_header(ckpt_path)
    class_path = config.get("model.class_path")
    if not class_path:
        raise ValueError("--config: the config names no model (model.class_path, e.g. StereoTask)")
    module_name, _, class_name = class_path.rpartition(".")
    task_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(task_class, type) and issubclass(task_class, LattnTask)):
        raise ValueError(f"--config: model {class_path} is not a lattn task; lattn export exports lattn tasks")
    init_args = config.get("model.init_args")
    init_args = init_args.as_dict() if init_args is not None else {}
    trained = header.get("hyper_parameters") or {}
    # What the CLI links from the datamodule (whatever the config says) was recorded in the checkpoint.
    for _, argument in LINKED_DATA_ATTRIBUTES:
        if trained.get(argument) is not None:
            init_args[argument] = trained[argument]
    problem = checkpoint_mismatch(header, task_class, init_args)
    if problem is not None:
        raise ValueError(f"{ckpt_path}: {problem}")
    init_args.pop("teacher_checkpoint", None)  # a distillation teacher only trains; it is not exported
    task = task_class(**init_args)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # Lightning's loading order: the task's hook (checks the weights' shapes, takes stereo's max_disparity) first.
    task.on_load_checkpoint(checkpoint)
    task.load_state_dict(checkpoint["state_dict"])
    return task.eval()


# --- exporting -----------------------------------------------------------------------------------------
def trace(wrapper: ExportWrapper, size: tuple[int, int], dynamic_size: bool) -> torch.export.ExportedProgram:
    """torch.export of `wrapper` traced at `size`, with its dynamic axes."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(wrapper, wrapper.example_inputs(size),
                                   dynamic_shapes=wrapper.dynamic_shapes(dynamic_size), strict=False)


def to_onnx(program: torch.export.ExportedProgram, wrapper: ExportWrapper, metadata: dict[str, Any]):
    """The ONNX model (onnx.ModelProto) of an exported program, with `metadata` in its metadata_props."""
    # The exporter's progress lines go to stdout and its optimiser's and IR's notes to the log ("Skipping
    # constant folding ...", "Attribute type is ambiguous ... Defaulted to INTS": the detector's empty axes
    # lists, which are ints); the command prints its own summary instead.
    quieted = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                                             input_names=list(wrapper.input_names),
                                             output_names=list(wrapper.output_names))
    finally:
        for logger, level in zip(quieted, levels):
            logger.setLevel(level)
    model = onnx_program.model_proto
    for key, value in metadata_props(metadata).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def metadata_props(metadata: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata_props are strings: one key per entry (JSON for lists and mappings), plus the whole."""
    props = {f"lattn.{key}": value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    props["lattn"] = json.dumps(metadata)
    return props


def relative_error(exported: Sequence[torch.Tensor], eager: Sequence[torch.Tensor]) -> float:
    """max |exported - eager| / max |eager| over every output; shapes must match. For integer outputs (labels)
    the fraction of elements that differ: an argmax of two scores equal to within rounding may go either way."""
    worst = 0.0
    for a, b in zip(exported, eager, strict=True):
        a = torch.as_tensor(a)
        if tuple(a.shape) != tuple(b.shape):
            return float("inf")
        if not b.is_floating_point():
            worst = max(worst, (a.to(b.dtype) != b).float().mean().item() if b.numel() else 0.0)
            continue
        scale = b.abs().max().item() if b.numel() else 0.0
        difference = (a.to(b.dtype) - b).abs().max().item() if b.numel() else 0.0
        worst = max(worst, difference / scale if scale > 0 else difference)
    return worst


def as_tuple(outputs: Any) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def onnx_session(model_bytes: bytes, threads: int | None = None):
    """An onnxruntime CPU session of an ONNX model (`threads`: its intra-op threads; None: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its shape-inference warnings are not the user's to act on
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(session, wrapper: ExportWrapper, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    feeds = {name: tensor.numpy() for name, tensor in zip(wrapper.input_names, inputs)}
    return tuple(torch.from_numpy(array) for array in session.run(list(wrapper.output_names), feeds))


def check_sizes(wrapper: ExportWrapper, size: tuple[int, int], dynamic_size: bool) -> list[tuple[int, int]]:
    """The traced size, and for a dynamic export a second one it did not see (one step of the size multiple
    larger in height, one smaller in width where that leaves two steps; with batch 1)."""
    if not dynamic_size:
        return [size]
    step = wrapper.size_multiple() if wrapper.size_multiple() > 1 else 16
    return [size, (size[0] + step, size[1] - step if size[1] >= 3 * step else size[1] + 2 * step)]


def export_model(task: LattnTask, fmt: str, size: tuple[int, int] | None = None, dynamic_size: bool = True,
                 check: bool = True, part: str = "all") -> tuple[bytes, dict[str, Any], dict[str, float]]:
    """Export `task` as `fmt`; return the file's bytes, its metadata and the relative errors checked.

    Raises a ValueError naming the part that cannot be exported (or that the exported model does not
    reproduce the eager one) before anything is written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}; got {fmt!r}")
    wrapper = export_wrapper(task, part)
    reasons = wrapper.fixed_size_reasons()
    if reasons and dynamic_size:
        log.info("Height and width are fixed in the exported file: %s", "; ".join(reasons))
        dynamic_size = False
    step = wrapper.size_multiple()
    size = tuple(size) if size is not None else wrapper.example_size(dynamic_size)
    if len(size) != 2 or min(size) < 1 or size[0] % step or size[1] % step:
        raise ValueError(f"--image_size: expected [height, width], both multiples of {step} (the network's coarsest "
                         f"stride); got {list(size)}")
    if dynamic_size and min(size) < wrapper.min_size():
        raise ValueError(f"--image_size: this network is traced at {wrapper.min_size()} pixels or more in height and "
                         f"width (its coarsest level needs 2 rows to vary in the exported file); got {list(size)}")
    what = describe(task_name(type(task)), task.hparams)
    failure = None
    try:
        program = trace(wrapper, size, dynamic_size)
    except Exception as error:  # noqa: BLE001 (the tracer's errors are many types; reported as one line)
        log.debug("torch.export failed", exc_info=True)  # the whole traceback with --debug logging
        hint = ""
        if isinstance(wrapper, DetectionExport):
            hint = ("; its feature pyramid (backbone and neck, nearly all of the computation) exports: pass --part "
                    "features and run the detector's RPN and RoI heads on those maps in Python (docs/export.md)")
        failure = (f"{what} cannot be exported (torch.export fails in {failing_part(error)}: {first_line(error)})"
                   f"{hint}; nothing written")
    if failure is not None:
        # Raised outside the handler, without the tracer's error: its frames hold the copies of the task's classes
        # that non-strict tracing makes, and while they live, a config naming the task (`model: DetectionTask`)
        # is ambiguous to the parser of the next command in this process.
        gc.collect()
        raise ValueError(failure)
    metadata = wrapper.metadata(dynamic_size)
    metadata["checkpoint_hparams"] = {key: value for key, value in task.hparams.items()
                                      if isinstance(value, (str, int, float, bool, type(None), list, dict))}
    if fmt == "onnx":
        try:
            model = to_onnx(program, wrapper, metadata)
        except Exception as error:  # noqa: BLE001
            log.debug("the ONNX exporter failed", exc_info=True)
            failure = (f"{what} cannot be exported to ONNX (torch.onnx's dynamo exporter fails in "
                       f"{failing_part(error)}: {first_line(error)}); --format torch_export may work; nothing written")
        if failure is not None:
            gc.collect()  # as above
            raise ValueError(failure)
        content = model.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
        content = buffer.getvalue()
    errors: dict[str, float] = {}
    if check:
        errors = check_export(wrapper, program, content if fmt == "onnx" else None,
                              check_sizes(wrapper, size, dynamic_size), what)
    return content, metadata, errors


def check_export(wrapper: ExportWrapper, program, onnx_bytes: bytes | None, sizes: list[tuple[int, int]],
                 what: str) -> dict[str, float]:
    """Relative errors of the exported program (and onnxruntime) against eager at each of `sizes`."""
    module = program.module()
    session = onnx_session(onnx_bytes) if onnx_bytes is not None else None
    errors: dict[str, float] = {}
    for index, size in enumerate(sizes):
        inputs = wrapper.example_inputs(size, batch=2 if index == 0 else 1)
        with torch.no_grad():
            eager = as_tuple(wrapper.reference(*inputs))
            runs = {"torch_export": lambda: as_tuple(module(*inputs))}
            if session is not None:
                runs["onnx"] = lambda: run_onnx(session, wrapper, inputs)
            for name, run in runs.items():
                try:
                    error = relative_error(run(), eager)
                except Exception as failure:  # noqa: BLE001
                    raise ValueError(f"{what}: the exported {name} model fails at {size[0]}x{size[1]} "
                                     f"({first_line(failure)}); nothing written") from failure
                errors[f"{name} {size[0]}x{size[1]}"] = error
                if not error <= TOLERANCE:
                    raise ValueError(f"{what}: the exported {name} model differs from the eager model at "
                                     f"{size[0]}x{size[1]} (relative error {error:.2g} > {TOLERANCE:g}); nothing written")
    return errors


def failing_part(error: BaseException) -> str:
    """Where tracing failed: the innermost call in lattn's or torchvision's code (file:line, function)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "lattn_app" in f.filename or "torchvision" in f.filename]
    if not ours:
        return "the tracer"
    frame = ours[-1]
    path = Path(frame.filename)
    package = next((i for i, part in enumerate(path.parts) if part in ("lattn_app", "torchvision")), 0)
    return f"{'/'.join(path.parts[package:])}:{frame.lineno} ({frame.name}: {frame.line})"


def first_line(error: BaseException) -> str:
    """The error's type and first line, and its first detail (torch.export lists what it could not trace as "- ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines[1:] if line.startswith("- ")][:1]
    return f"{type(error).__name__}: {' '.join(lines[:1] + details) if lines else '(no message)'}"


# --- the command -----------------------------------------------------------------------------------
def export_command(argv: Sequence[str]) -> Path:
    """`lattn export ...`: check the options, build the model, export, check, write. Returns the output path."""
    words = list(argv)
    if not any(word in ("-h", "--help") for word in words) and not any(
            word == "--config" or word.startswith(("--config=", "--model")) for word in words):
        raise ValueError("--config: expected the config the checkpoint was trained with (e.g. --config "
                         "configs/sceneflow_efficient.yaml); `lattn export --help` lists the options")
    cli = ExportCLI(words)
    config = cli.config
    fmt, output, ckpt_path = config.get("format"), config.get("output"), config.get("ckpt_path")
    if fmt not in FORMATS:
        raise ValueError(f"--format: expected one of {', '.join(FORMATS)}; got {fmt!r}")
    if config.get("part") not in PARTS:
        raise ValueError(f"--part: expected one of {', '.join(PARTS)}; got {config.get('part')!r}")
    if not output:
        raise ValueError(f"--output: expected the file to write (e.g. model{FORMATS[fmt]}); none given")
    output = Path(output)
    if output.suffix != FORMATS[fmt]:
        raise ValueError(f"--output: a --format {fmt} file ends in {FORMATS[fmt]}; got {output}")
    if output.exists() and not config.get("overwrite"):
        raise FileExistsError(f"--output: {output} exists; pass --overwrite true to replace it (nothing written)")
    if output.is_dir():
        raise ValueError(f"--output: {output} is a folder; expected a file name")
    if not ckpt_path:
        raise ValueError("--ckpt_path: expected the trained checkpoint to export (e.g. checkpoints/<run>/best.ckpt)")
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path: {ckpt_path} is not a file (expected a lattn checkpoint, .ckpt)")
    size = config.get("image_size")
    task = build_task(config, ckpt_path)
    content, metadata, errors = export_model(task, fmt, tuple(size) if size else None, bool(config.get("dynamic_size")),
                                             part=config.get("part"))
    write_atomically(output, lambda file: file.write(content), overwrite=bool(config.get("overwrite")))
    fixed = metadata["fixed_size"]
    print(f"Exported {metadata['task']} ({', '.join(f'{k}: {v:.1e}' for k, v in errors.items())} relative error "
          f"against the eager model) to {output} ({len(content) / 1e6:.1f} MB); dynamic axes: "
          f"{', '.join(metadata['dynamic_axes']) or 'none'}" + (f"; fixed size {fixed[0]}x{fixed[1]}" if fixed else ""),
          flush=True)
    return output
