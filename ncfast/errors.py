"""The base of every error ncfast raises on purpose, so callers (and the CLI) catch one type.

Each subclass also derives from the built-in exception it refines (``ValueError`` for bad input,
``FloatingPointError`` for a diverged run), so ``except ValueError`` keeps working. The message
is meant for the user: it names the argument, file or option and what was wrong.
"""

from __future__ import annotations


class NCFastError(Exception):
    """An error ncfast raised on purpose, with a message that says what to do."""
