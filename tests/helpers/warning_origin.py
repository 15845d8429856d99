"""Where a warning points (its filename and line), checked the same way in and out of mutmut."""

from __future__ import annotations

import linecache
import os
from pathlib import Path


def assert_warned_from(warning, filename: str, lineno: int | None = None) -> None:
    """``warning`` points at ``filename`` (at ``lineno`` when given): the caller that a warnings
    filter on the user's module should see.

    Under mutmut (``MUTANT_UNDER_TEST`` set, even to "") every mutated function is called through
    two frames of mutmut's ``trampoline.py``: the warning then points at the trampoline's line
    that calls the function, the frame just outside it. A warning one frame too far out points
    at the trampoline's wrapper line instead, one frame too near at the library's own file: both
    fail here, as they fail without mutmut. Where the function that warns is not in the module
    mutmut mutates (no trampoline), the warning points at ``filename`` as without mutmut.
    """
    if "MUTANT_UNDER_TEST" in os.environ and Path(warning.filename).name == "trampoline.py":
        line = linecache.getline(warning.filename, warning.lineno)
        assert "_func(*call_args" in line, f"{warning.filename}:{warning.lineno}: {line.strip()}"
        return
    assert warning.filename == filename
    assert lineno is None or warning.lineno == lineno
