"""What the command-line scripts share: user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from minilm.config import ModelConfig, choice_fields
from minilm.errors import MinilmError


def main_guard(main: Callable[[], int]) -> int:
    """Run a CLI's main(); MinilmError -> 'error: …' on stderr and exit 2, Ctrl-C -> exit 130."""
    try:
        return main()
    except MinilmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last saved state is kept; continue with --resume --out RUN_DIR", file=sys.stderr)
        return 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with every default shown, and the description (usage examples) kept as written."""


def add_shape_flags(group: argparse._ArgumentGroup, note: str) -> None:
    """--d-model, --n-layers, --n-heads, --d-ff, --norm-position: the preset's shape, changed."""
    for name in ("d-model", "n-layers", "n-heads", "d-ff"):
        group.add_argument(f"--{name}", type=int, default=None, help=note)
    group.add_argument("--norm-position", choices=choice_fields(ModelConfig)["norm_position"], default=None,
                       help=f"{note}: normalise each sublayer's input (pre-LN: GPT-2, Llama; trains stably at "
                            "high learning rates) or the residual sum (post-LN: BERT)")


def add_machine_flags(group: argparse._ArgumentGroup) -> None:
    """The flags every training CLI shares: where and how it computes."""
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast precision; auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--seed", type=int, default=0, help="weights init, data order, masking")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
