"""The project's user-facing error type.

Two kinds of failure exist in minilm:

* **User errors** — a missing file, an unknown corpus name, a download that failed,
  a sequence length longer than the data. These raise `MinilmError` with a one-line
  message that names the problem *and* the fix. The CLIs catch it, print the message
  on stderr as one line and exit with status 2.
* **Bugs** — everything else raises normally (with a traceback), because a traceback
  is what a developer needs to fix a bug.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MinilmError(Exception):
    """A problem the user can fix; the message says what went wrong and how to fix it."""


def import_transformers() -> ModuleType:
    """Hugging Face transformers, an optional dependency (interop, HF inits, benchmarks),
    imported when first needed; missing, it is a user error that says how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise MinilmError("this needs Hugging Face transformers: pip install 'minilm[hf]'") from err
