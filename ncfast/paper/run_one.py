"""One training run in a process of its own, from its options as JSON: how ``ncfast sweep``
starts its runs (``python -m ncfast.paper.run_one OPTIONS --out DIR [--resume | --overwrite]
[--stop-after EPOCH]``), without going through the command line of ``ncfast train``.

``OPTIONS`` is a JSON object of :class:`ncfast.paper.config.TrainConfig` fields (``preset``
among them); the run is :func:`ncfast.paper.train.train` of that configuration. An error ends
the process with one line, ``Error: ...`` (exit code 1; 2 for an option the library refused),
as ``ncfast train`` prints it: the sweep records that line as the run's failure reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ncfast.errors import NCFastError
from ncfast.paper.config import SEQUENCE_FIELDS, TrainConfig
from ncfast.paper.train import train


def run_config(
    options: Mapping,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainConfig:
    """The TrainConfig of one run: ``options`` (TrainConfig fields, ``preset`` among them) in
    the run directory ``out``, started (``overwrite``: over a run that stopped before its first
    checkpoint) or resumed, up to ``stop_after``."""
    values = dict(options)
    preset = values.pop("preset", None)
    for key in SEQUENCE_FIELDS:  # lists in JSON
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return TrainConfig.from_preset(
        preset,
        **values,
        out=str(out),
        resume=resume,
        overwrite=overwrite,
        stop_after=stop_after,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ncfast.paper.run_one")
    parser.add_argument("options", help="the run's TrainConfig fields, as a JSON object")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"options: expected a JSON object, got {args.options[:60]!r}")
        config = run_config(
            options,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            stop_after=args.stop_after,
        )
        train(config, progress=False)
    except NCFastError as exc:  # first: most of them are ValueErrors too
        return _error(str(exc), 1)
    except (ValueError, TypeError) as exc:
        return _error(str(exc), 2)
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else f" to {Path(args.out)}"
        return _error(f"cannot write{where} ({exc.strerror or exc})", 1)
    return 0


def _error(message: str, code: int) -> int:
    print(f"Error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
