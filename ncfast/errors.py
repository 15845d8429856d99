"""The base of every error ncfast raises on purpose, so callers (and the CLI) catch one type,
and where its warnings point (:func:`user_stacklevel`).

Each subclass also derives from the built-in exception it refines (``ValueError`` for bad input,
``FloatingPointError`` for a diverged run), so ``except ValueError`` keeps working. The message
is meant for the user: it names the argument, file or option and what was wrong.
"""

from __future__ import annotations

import os
import sys
from types import FrameType

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class NCFastError(Exception):
    """An error ncfast raised on purpose, with a message that says what to do."""


def user_stacklevel(*packages: str) -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the
    first frame outside the ncfast package and outside the imported ``packages`` (e.g.
    ``"torchmetrics"``, whose wrapper calls a metric's ``compute``): the user's line, however
    deep the call came. Call it in the ``warnings.warn`` call itself."""
    folders = [_PACKAGE_DIR]
    for name in packages:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            folders.append(os.path.dirname(os.path.abspath(file)) + os.sep)
    inside = tuple(folders)
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
