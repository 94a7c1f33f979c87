"""What the command-line scripts share: user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import TypeVar, get_args

from minilm.config import SHAPE_FIELDS, ModelConfig, choice_fields, flag
from minilm.errors import MinilmError
from minilm.training import Interrupted, Precision


def main_guard(main: Callable[[], int], resumable: bool = False) -> int:
    """Run a CLI's main(); MinilmError or OSError -> 'error: …' on stderr and exit 2, Ctrl-C -> exit 130.
    resumable: the script has --resume, so an interrupted training run says how to continue it."""
    try:
        return main()
    except MinilmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:      # a path the user gave cannot be read or written: no traceback for that
        print(f"error: {err.filename}: {err.strerror}" if err.filename else f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        saved = f": the state is saved in {stop.run_dir}/state; continue with --resume --out {stop.run_dir}"
        print(f"interrupted at step {stop.step}{saved if resumable else ''}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise MinilmError, so that main_guard prints them as one line
    (and exit code 2, as argparse's own) like every other user error; --help still exits 0."""

    def error(self, message: str):
        raise MinilmError(f"{message} (see {self.prog} --help)")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the flags a command line gives, whatever their values: a flag given with its
    default value is given too (comparing values with the defaults would miss it). Parsed a
    second time with every default suppressed, so abbreviations count as argparse reads them."""
    actions = [action for action in parser._actions if action.dest != "help"]
    defaults = [action.default for action in actions]
    try:
        for action in actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in zip(actions, defaults):
            action.default = default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown, and the description (usage examples) kept as written.
    A default of None means "not given": the flag's help says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def choices(settings: type, name: str) -> tuple[str, ...]:
    """The values a config dataclass's Literal-typed field allows, as a flag's choices (None, "not
    given", is the flag's absence). One list per choice: the type is where it is written."""
    return tuple(v for v in choice_fields(settings)[name] if v is not None)


Settings = TypeVar("Settings")


def config_from_args(settings: type[Settings], args: argparse.Namespace, **given) -> Settings:
    """The config dataclass `settings` with every field read from the flag of the same name;
    `given` sets the others (fields with neither keep their default)."""
    from_flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings)
                  if f.name not in given and hasattr(args, f.name)}
    return settings(**from_flags, **given)


def add_shape_flags(group: argparse._ArgumentGroup, note: str) -> None:
    """--d-model, --n-layers, --n-heads, --d-ff, --norm-position (SHAPE_FIELDS): the preset's shape, changed."""
    for name in SHAPE_FIELDS:
        if name == "norm_position":
            group.add_argument("--norm-position", choices=choices(ModelConfig, name), default=None,
                               help=f"{note}: normalise each sublayer's input (pre-LN: GPT-2, Llama; trains "
                                    "stably at high learning rates) or the residual sum (post-LN: BERT)")
        else:
            group.add_argument(flag(name), type=int, default=None, help=note)


def add_machine_flags(group: argparse._ArgumentGroup) -> None:
    """The flags every training CLI shares: where and how it computes."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", choices=get_args(Precision),
                       help="autocast precision; auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--seed", type=int, default=0, help="weights init, data order, masking")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
