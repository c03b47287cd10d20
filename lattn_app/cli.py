"""The `lattn` command: LightningCLI for fit / validate / test / predict, plus `lattn list`.

    lattn fit --config configs/<task>.yaml          # train (any Trainer/model/data key can be overridden)
    lattn test --config configs/<task>.yaml --ckpt_path <checkpoint>
    lattn list                                       # registered attention mechanisms and backbones
    lattn bench attention --quick                    # speed and memory benchmarks (also: backbone, claims)
    lattn export --config X.yaml --ckpt_path Y --format onnx --output model.onnx   # deployable model

Tests and notebooks call ``main([...])`` with the same words as the command line.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from . import __version__, callbacks, data, tasks  # noqa: F401 (tasks, datamodules, callbacks by short class name)
from .backbones import create_backbone
from .registry import ATTENTIONS, BACKBONES, Entry, UnknownNameError, builder_options
from .tasks import LattnTask
from .tasks.record import checkpoint_mismatch, read_checkpoint_header

log = logging.getLogger(__name__)

DEFAULT_SEED = 42
# (datamodule attribute, model argument) pairs the CLI fills in from the datamodule: facts of the data
# that the model cannot be trained without. What the model owns but may take from the data when unset
# (StereoTask.max_disparity) is filled by LattnTask.fill_from_data instead, so the config can still set it.
LINKED_DATA_ATTRIBUTES = (
    ("num_classes", "num_classes"),
    ("class_names", "class_names"),
    ("category_ids", "category_ids"),
)

LIGHTNING_COMMANDS = {
    "fit": "train a model (resume with --ckpt_path last)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the held-out test split and write test_metrics.json",
    "predict": "run a checkpoint on new data and write its predictions",
}
LATTN_COMMANDS = {
    "list": "print every registered attention mechanism and backbone",
    "bench": "measure speed and memory: `lattn bench attention|crossover|timm|backbone|claims|export` (see BENCHMARKS.md)",
    "export": "write a checkpoint as an ONNX file or torch.export program (see docs/export.md)",
}
COMMANDS = {**LIGHTNING_COMMANDS, **LATTN_COMMANDS}
DEBUG_VARIABLE = "LATTN_DEBUG"  # set to 1: errors show their whole traceback

HELP = f"""usage: lattn COMMAND [options]

lattn trains and evaluates vision models built on memory-efficient attention.

commands:
{chr(10).join(f"  {name:<10}{text}" for name, text in COMMANDS.items())}

`lattn COMMAND --help` shows a command's options. fit, validate, test and predict take
--config FILE.yaml (configs/ holds the shipped ones) and any of its keys as an option, e.g.
--trainer.max_epochs 5; `lattn fit --config FILE.yaml --print_config` prints the whole config.

options:
  -h, --help  show this message and exit
  --version   print the version and exit

Errors are printed as one line; set {DEBUG_VARIABLE}=1 to see the whole traceback.
"""

SUBCOMMAND_DESCRIPTION = (
    "{text}. The options below are mostly Lightning's Trainer's; the task's and the datamodule's own "
    "options are listed by `lattn {name} --config FILE.yaml --model.help CLASS` and `--data.help CLASS` "
    "(CLASS as in the config, e.g. StereoTask, SceneFlowDataModule)."
)

# Lightning's Trainer annotates these Union[float, int, None], so the parser reads `1` as 1.0, which
# Lightning takes as "all batches". lattn reads what the user wrote: an integer is a number of batches.
LIMIT_BATCH_KEYS = tuple(f"limit_{split}_batches" for split in ("train", "val", "test", "predict"))


def config_chain(path: Path, extended_by: tuple[Path, ...] = ()) -> list[Path]:
    """`path` preceded by the configs it builds on: its ``extends:`` file (relative to it), recursively."""
    try:
        content = yaml.safe_load(path.read_text())
    except OSError:
        return [path]  # the parser reports a missing or unreadable file
    except yaml.YAMLError as error:  # the parser's own message would say "<unicode string>", not the file
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start is not None:  # where the unclosed bracket or block began
            problem += f", {context} at line {start.line + 1}, column {start.column + 1}"
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
    base = content.get("extends") if isinstance(content, dict) else None
    if not base:
        return [path]
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in (*extended_by, path)}:
        raise ValueError(f"{path}: 'extends: {base}' makes a cycle of configs that extend each other")
    if not base_path.is_file():
        raise FileNotFoundError(f"{path}: 'extends: {base}' names {base_path}, which is not a file")
    return [*config_chain(base_path, (*extended_by, path)), path]


def _config_class(class_path: Any) -> type | None:
    """The task or datamodule class a config's ``class_path`` names (short name or dotted path); None: unknown."""
    if not isinstance(class_path, str):
        return None
    if "." not in class_path:
        return getattr(tasks, class_path, None) or getattr(data, class_path, None)
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def check_config_keys(files: Sequence[Path]) -> dict[str, type | None]:
    """A one-line error for a misspelled ``model``/``data`` option in a config file, naming the file and key.

    jsonargparse reports it as a Union-subtypes dump without the file; this checks each file of an
    ``extends`` chain against the class its chain has named so far (unknown classes are left to it).
    Returns the ``model`` and ``data`` classes the chain names (for :func:`check_command_line_keys`).
    """
    classes: dict[str, type | None] = {}
    for file in files:
        content = yaml.safe_load(file.read_text()) or {}
        if not isinstance(content, dict):
            continue
        for group in ("model", "data"):
            section = content.get(group)
            if not isinstance(section, dict):
                continue
            if "class_path" in section:
                classes[group] = _config_class(section["class_path"])
            init_args = section.get("init_args")
            if isinstance(init_args, dict):
                for key in init_args:
                    _check_option(classes.get(group), key, f"{file}: {group}.init_args.{key}")
    return classes


# Words after --model. / --data. that are jsonargparse's own, not options of the class.
PARSER_KEYS = {"class_path", "init_args", "dict_kwargs", "help"}


def check_command_line_keys(words: Sequence[str], classes: dict[str, type | None]) -> None:
    """A one-line error for a misspelled ``--model.X`` / ``--data.X`` option on the command line.

    `classes` are those the configs name; a ``--model NAME`` / ``--data NAME`` word overrides them.
    """
    classes = dict(classes)
    for index, word in enumerate(words):
        option, has_value, inline_value = word.partition("=")
        group, _, rest = option.removeprefix("--").partition(".")
        if not word.startswith("--") or group not in ("model", "data"):
            continue
        value = inline_value if has_value else words[index + 1] if index + 1 < len(words) else None
        key = rest.removeprefix("init_args.").split(".")[0]
        if key in ("", "class_path"):  # --model NAME or --model.class_path NAME: the class itself
            classes[group] = _config_class(value)
        elif key not in PARSER_KEYS:
            _check_option(classes.get(group), key, option)


def _check_option(cls: type | None, key: str, where: str) -> None:
    accepted = builder_options(cls) if cls is not None else None
    if accepted is None or key in accepted:
        return  # an unknown class, or one taking **kwargs: left to the parser
    close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; its options: {', '.join(accepted)}"
    raise ValueError(f"{where} is not an option of {cls.__name__}{hint}")


def with_extended_configs(args: Sequence[str]) -> list[str]:
    """The command's words with every ``--config FILE`` preceded by the configs FILE extends."""
    words, expanded, index, classes = list(args), [], 0, {}
    while index < len(words):
        word = words[index]
        if word == "--config" and index + 1 < len(words):
            path, index = words[index + 1], index + 2
        elif word.startswith("--config="):
            path, index = word.split("=", 1)[1], index + 1
        else:
            expanded.append(word)
            index += 1
            continue
        chain = config_chain(Path(path))
        if all(file.is_file() for file in chain):
            classes.update(check_config_keys(chain))
        for file in chain:
            expanded += ["--config", str(file)]
    check_command_line_keys(words, classes)
    return expanded


class LattnCLI(LightningCLI):
    """LightningCLI in subclass mode: YAML names a model/data class by its short name or class_path.

    The run's full config is saved next to its logs (overwriting an earlier one of the same run
    directory), and the seed defaults to a fixed value so two identical commands train identically.
    With ``--ckpt_path`` the config builds the model and the checkpoint must fit it (see
    :meth:`_parse_ckpt_path`); checkpoints record the config they were trained with.

    Configs build on each other: a config that starts with ``extends: base.yaml`` (a path relative to
    it) is read after that base, so an overlay states only what it changes. The run is named after the
    last config file (``configs/sceneflow_softmax.yaml``: ``sceneflow_softmax``), and so are its folders
    where the config does not name them: the TensorBoard logger's ``name`` (left at its default), the
    checkpoint callback's ``dirpath`` (unset) -> ``checkpoints/<run>``, and a prediction writer's
    ``output_dir`` (left at its default) -> ``predictions/<run>``.
    """

    def parse_arguments(self, parser, args) -> None:
        words = sys.argv[1:] if args is None else args
        if isinstance(words, (list, tuple)):
            expanded = with_extended_configs(words)
            self._words = expanded
            if expanded != list(words):
                self.config = parser.parse_args(expanded)
                return
        super().parse_arguments(parser, args)

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("parser_kwargs", {
            "prog": "lattn", "version": __version__,
            **{name: {"description": SUBCOMMAND_DESCRIPTION.format(name=name, text=text.capitalize())}
               for name, text in LIGHTNING_COMMANDS.items()},
        })
        super().__init__(args=args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Check that a ``--ckpt_path`` file fits the configured lattn task, before anything is built.

        LightningCLI's own version rebuilds the model from the checkpoint's hyperparameters over the
        config: the config's model options would be ignored without a word (only for a file path, not for
        ``last``), and a checkpoint of another task would become that task, fed this task's data. Here
        the config decides, and a checkpoint of another task, backbone or attention mechanism is an error
        that says what differs (LattnTask.on_load_checkpoint checks the weights' shapes too).
        """
        config = self.config.get(str(self.config.get("subcommand")))
        class_path = config.get("model.class_path") if config is not None else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if not class_path or not ckpt_path or not Path(ckpt_path).is_file():
            return
        module_name, _, class_name = class_path.rpartition(".")
        task_class = getattr(importlib.import_module(module_name), class_name)
        if not issubclass(task_class, LattnTask):
            super()._parse_ckpt_path()  # not a lattn task: Lightning's behaviour
            return
        init_args = config.get("model.init_args")
        header = read_checkpoint_header(ckpt_path)  # no weights read
        problem = checkpoint_mismatch(header, task_class, init_args.as_dict() if init_args is not None else {})
        if problem is not None:
            raise ValueError(f"{ckpt_path}: {problem}")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        config["extends"] = None  # the saved config is whole: it extends nothing
        # jsonargparse turns `1` into 1.0 again when it builds the Trainer: they go in as arguments there.
        self._integer_batch_limits = integer_batch_limits(getattr(self, "_words", []), config)
        for key, value in self._integer_batch_limits.items():
            config[f"trainer.{key}"] = value  # the saved config says what ran
        name_run_folders(config)
        # validate/test/predict from a checkpoint: the checkpoint holds every weight, so the backbone's
        # `pretrained` source is not loaded first (it may need a download or a file that has moved).
        if self.subcommand in ("validate", "test", "predict"):
            weights_come_from_checkpoint(config, config.get("ckpt_path"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        return super().instantiate_trainer(**{**getattr(self, "_integer_batch_limits", {}), **kwargs})

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        if config.get("untrained"):
            raise ValueError("--untrained applies to validate, test and predict; fit trains the model")
        if config.get("ckpt_path") == "last":
            self._check_last_checkpoint_exists()
        # Checkpoints record the config they were trained with (LattnTask.on_save_checkpoint).
        if isinstance(self.model, LattnTask):
            if not config.get("ckpt_path"):  # a resumed run keeps its checkpoint's values
                for name, value in self.model.fill_from_data(self.datamodule).items():
                    config[f"model.init_args.{name}"] = value  # the saved config says what the model used
            self.model.training_config = self._parser(self.subcommand).dump(config, skip_none=False)
            self.model.training_config_files = [str(path) for path in config.get("config") or []]

    def _check_last_checkpoint_exists(self) -> None:
        """``--ckpt_path last`` resumes this config's run: refuse, naming the folder, when it has no last.ckpt.

        Lightning would warn and train from scratch instead, exiting 0 after doing something else.
        """
        folders = [Path(callback.dirpath) for callback in self.trainer.checkpoint_callbacks
                   if isinstance(callback, callbacks.LattnCheckpoint) and callback.dirpath]
        if folders and not any((folder / "last.ckpt").is_file() for folder in folders):
            raise FileNotFoundError(
                f"--ckpt_path last: there is no last.ckpt in {', '.join(map(str, folders))} (this config's checkpoint "
                "folder), so there is no run to resume. Train without --ckpt_path to start one, or pass the path of "
                "a checkpoint"
            )

    def _require_checkpoint(self, subcommand: str) -> None:
        """Evaluating or predicting needs the trained weights: refuse a run without --ckpt_path unless asked for."""
        config = self.config[subcommand]
        if isinstance(self.model, LattnTask) and not config.get("ckpt_path") and not config.get("untrained"):
            raise ValueError(
                f"lattn {subcommand} needs the trained model: pass --ckpt_path (e.g. checkpoints/<run>/best.ckpt, "
                "or last). Without it the model has untrained, random weights; pass --untrained true to run it so"
            )

    def before_validate(self) -> None:
        self._require_checkpoint("validate")

    def before_test(self) -> None:
        self._require_checkpoint("test")

    def before_predict(self) -> None:
        self._require_checkpoint("predict")

    def after_validate(self) -> None:
        self.write_metrics("validate")

    def after_test(self) -> None:
        self.write_metrics("test")

    def write_metrics(self, subcommand: str) -> Path | None:
        """Save the metrics of `validate`/`test` as JSON next to the run's logs, with the checkpoint used."""
        log_dir = self.trainer.log_dir  # every process: under DDP it is broadcast from rank 0
        if not self.trainer.is_global_zero:
            return None
        metrics = {name: float(value) for name, value in sorted(self.trainer.callback_metrics.items())}
        directory = Path(log_dir or self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{subcommand}_metrics.json"
        record = {"subcommand": subcommand, "ckpt_path": self.trainer.ckpt_path, "metrics": metrics}
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{subcommand} metrics written to {path}", flush=True)
        return path

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--extends", type=str | None, default=None,
                            help="In a config file: the config it builds on (a path relative to it), read first.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: let a new run replace the checkpoints an earlier run left in its folder; "
                                 "predict: replace the prediction files an earlier run wrote; "
                                 "export: replace an existing --output file.")
        parser.add_argument("--untrained", type=bool, default=False,
                            help="validate/test/predict: run the untrained model (no --ckpt_path) on purpose.")
        # What the data determines is linked, not repeated: the model gets it from the datamodule
        # instance. A link whose source or target a chosen class lacks is skipped by jsonargparse.
        for data_attribute, model_argument in LINKED_DATA_ATTRIBUTES:
            parser.link_arguments(f"data.{data_attribute}", f"model.init_args.{model_argument}", apply_on="instantiate")


def weights_come_from_checkpoint(config, ckpt_path: str | None) -> None:
    """With a checkpoint (validate/test/predict, export), the backbone's `pretrained` source is not loaded first.

    The checkpoint holds every weight, and the source may need a download or a file that has moved.
    """
    options = config.get("model.init_args.backbone_options")
    if ckpt_path and isinstance(options, dict) and options.get("pretrained"):
        log.info("Weights come from %s; not loading backbone_options.pretrained=%s", ckpt_path, options["pretrained"])
        config["model.init_args.backbone_options"] = {**options, "pretrained": None}


def integer_batch_limits(words: Sequence[str], config) -> dict[str, int]:
    """The ``trainer.limit_*_batches`` that the user wrote as an integer, which the parser made a float.

    The last place that sets a key decides, as in the parser: the command line after the config files,
    a later config file after an earlier one.
    """
    written: dict[str, object] = {}
    for file in config.get("config") or []:  # config files, in the order they were read
        try:
            content = yaml.safe_load(Path(str(file)).read_text())
        except (OSError, yaml.YAMLError):
            continue
        trainer = content.get("trainer") if isinstance(content, dict) else None
        for key in LIMIT_BATCH_KEYS:
            if isinstance(trainer, dict) and key in trainer:
                written[key] = trainer[key]
    for index, word in enumerate(words):
        for key in LIMIT_BATCH_KEYS:
            if word == f"--trainer.{key}" and index + 1 < len(words):
                written[key] = yaml.safe_load(words[index + 1])
            elif word.startswith(f"--trainer.{key}="):
                written[key] = yaml.safe_load(word.split("=", 1)[1])
    return {key: value for key, value in written.items()
            if isinstance(value, int) and not isinstance(value, bool) and config.get(f"trainer.{key}") == value}


def name_run_folders(config) -> None:
    """Name the logger's and callbacks' folders after the last config file, where the config leaves them unset.

    ``--overwrite true`` is passed on to the checkpoint callbacks and lattn's prediction writers here too.
    """
    if config.get("overwrite"):
        for callback in config.get("trainer.callbacks") or []:
            if _is_class(callback, "LattnCheckpoint") or (_is_class(callback, "PredictionWriter")
                                                           and callback.class_path.startswith("lattn_app.")):
                callback.init_args["overwrite"] = True
    files = config.get("config") or []
    if not files:
        return
    run = Path(str(files[-1])).stem
    logger = config.get("trainer.logger")
    if _is_class(logger, "TensorBoardLogger") and logger.init_args.get("name") in (None, "lightning_logs"):
        logger.init_args["name"] = run
    for callback in config.get("trainer.callbacks") or []:
        if _is_class(callback, "Checkpoint") and callback.init_args.get("dirpath") is None:
            callback.init_args["dirpath"] = f"checkpoints/{run}"
        if _is_class(callback, "PredictionWriter") and callback.init_args.get("output_dir") in (None, "predictions"):
            callback.init_args["output_dir"] = f"predictions/{run}"


def _is_class(entry: object, suffix: str) -> bool:
    class_path = getattr(entry, "class_path", None)
    return isinstance(class_path, str) and class_path.endswith(suffix) and getattr(entry, "init_args", None) is not None


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _described(entry: Entry) -> str:
    return entry.description + ("" if entry.source == "lattn" else f" [{entry.source}]")


def print_attentions() -> None:
    entries = ATTENTIONS.entries()
    print(f"Attention mechanisms ({len(entries)})")
    yes_no = {True: "yes", False: "-"}
    rows = [("NAME", "TIME", "MEMORY", "ROPE", "CROSS", "FIXED GRID", "DESCRIPTION")]
    rows += [(e.name, e.time, e.memory, yes_no[e.rope], e.cross_attention, yes_no[e.fixed_grid], _described(e))
             for e in entries]
    _print_table(rows)


def print_backbones(complexity: bool, image_size: int | None) -> None:
    entries = BACKBONES.entries()
    print(f"Backbones ({len(entries)})")
    if not complexity:
        _print_table([("NAME", "DESCRIPTION")] + [(e.name, _described(e)) for e in entries])
        return
    rows = [("NAME", "PARAMS", "GMACS", "AT", "DESCRIPTION")]
    for e in entries:
        try:
            native = (e.options() or {}).get("img_size")
            size = image_size or (native.default if native is not None else 224)
            options = {"img_size": size} if native is not None else {}
            cost = create_backbone(e.name, **options).complexity(size)
            rows.append((e.name, f"{cost.params_m:.2f}M", f"{cost.gmacs:.3f}", f"{size}x{size}", _described(e)))
        except Exception as error:  # one backbone that cannot be built at this size must not hide the rest
            rows.append((e.name, "-", "-", "-", f"{_described(e)} (not measured: {error})"))
    _print_table(rows)


def list_command(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lattn list",
        description="Print the registered attention mechanisms and backbones (plug-ins included). "
        "Mechanisms show their time and memory complexity in the token count N (d: head size, C: width, "
        "m: features or landmarks, k: projected length, h: hidden size); backbones show their parameters "
        "and GMACs with --complexity.",
    )
    parser.add_argument("what", nargs="?", choices=("all", "attention", "backbones"), default="all")
    parser.add_argument("--complexity", action="store_true",
                        help="build each backbone and count its parameters and GMACs (one image)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side for --complexity (default: each backbone's own input size)")
    options = parser.parse_args(list(argv))
    if options.what in ("all", "attention"):
        print_attentions()
    if options.what == "all":
        print()
    if options.what in ("all", "backbones"):
        print_backbones(options.complexity, options.image_size)


def show_lattn_logs(level: int = logging.INFO) -> None:
    """Print lattn's own log lines (which data is used, what was loaded) next to Lightning's."""
    logger = logging.getLogger("lattn_app")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lattn] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `lattn` and `python -m lattn_app`; `args` defaults to the command line.

    Errors propagate as exceptions (tests and notebooks call ``main([...])``); the console command
    (:func:`console_main`) prints them as one line.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        raise SystemExit(0)
    if argv[0] == "list":
        try:
            list_command(argv[1:])
        except BrokenPipeError:  # `lattn list | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return
    if argv[0] == "bench":
        from .bench import bench_command  # imported here: plotting and profiling only load for benchmarks

        bench_command(argv[1:])
        return
    if argv[0] == "export":
        show_lattn_logs()
        from .export import export_command  # imported here: the exporters only load for exporting

        export_command(argv[1:])
        return
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"lattn: error: unknown command '{argv[0]}'; {hint}commands: {', '.join(COMMANDS)} "
              "(lattn --help describes them)", file=sys.stderr)
        raise SystemExit(2)
    show_lattn_logs()
    # LightningCLI reads sys.argv itself when args is None (and warns if given both).
    LattnCLI(args=None if args is None else argv)
    # Under DDP the process group outlives the run; left to the interpreter's exit, gloo's threads can be
    # torn down mid-flight and abort a run that has finished ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# Exceptions that lattn raises on purpose about its input, settings or files: shown as their message.
USER_ERROR_TYPES = (ValueError, OSError, UnknownNameError, FloatingPointError, RuntimeError, NotImplementedError)
WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_error_message(error: BaseException) -> str | None:
    """The one-line message for an error about the user's input, or None for anything else (a bug).

    The message is lattn's own, even where another library re-raised it: jsonargparse wraps errors of a
    class's ``__init__`` in "Does not validate against any of the Union subtypes ...", a DataLoader
    worker's error arrives as a copy whose text holds the worker's traceback.
    """
    chain, seen = [], set()
    while error is not None and id(error) not in seen:  # outermost first
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    for candidate in reversed(chain):  # the innermost of ours is the one the user must read
        if isinstance(candidate, USER_ERROR_TYPES) and _raised_by_lattn(candidate):
            return _one_line(str(candidate))
    for candidate in chain:
        text = str(candidate)
        if WORKER_TRACEBACK in text and "lattn_app" in text:
            last = [line for line in text.splitlines() if line.strip()][-1]
            return _one_line(last.split(": ", 1)[1] if ": " in last else last)
    return None


def _raised_by_lattn(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "(no message)"


def console_main() -> None:
    """The `lattn` command: :func:`main`, with errors about the user's input printed as one line.

    ``LATTN_DEBUG=1`` shows the whole traceback instead; an error that is not about the input (a bug)
    always does.
    """
    try:
        main()
    except Exception as error:  # noqa: BLE001 (sorted below: the user's errors as a line, bugs as tracebacks)
        message = None if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0") else user_error_message(error)
        if message is None:
            raise
        print(f"lattn: error: {message}", file=sys.stderr)
        print(f"(set {DEBUG_VARIABLE}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    console_main()
