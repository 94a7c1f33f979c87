"""What the command-line scripts share: user errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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
