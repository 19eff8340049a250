"""What every command shares: --debug, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from ..errors import DenucError

EXIT_USER_ERROR = 2


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace, prog: str) -> int:
    """Call ``main(args)``; print a user error as one line, prefixed by ``prog``, and return a non-zero code.

    Warnings are printed as one line too: Python's default adds the library's file and source
    line, which tells a user nothing.
    """
    shown = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"
    try:
        return main(args) or 0
    except DenucError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = shown


def parse_data_args(values: list[str]) -> list[tuple[str, str]]:
    """``name=PATH`` pairs from repeated ``--data`` options."""
    out = []
    for v in values or []:
        name, sep, root = v.partition("=")
        if not sep or not name or not root:
            raise DenucError(f"--data expects NAME=PATH (e.g. brca_m2c=/data/brca_m2c), got {v!r}")
        out.append((name, root))
    return out


def folder_options(dataset: str, class_map: dict | None, mpp: float | None) -> dict:
    """``load_dataset`` options from ``--class-map`` and ``--mpp``, which only the generic ``folder`` format takes."""
    if mpp is not None and not 0.01 <= mpp <= 100:
        raise DenucError(f"--mpp is micrometres per pixel (0.25 = 40x, 0.5 = 20x), got {mpp:g}")
    if dataset != "folder":
        if class_map or mpp is not None:
            raise DenucError(f"--class-map and --mpp apply to folder data; {dataset} states its own classes and resolution")
        return {}
    return {"class_map": class_map, "default_mpp": mpp}


def encoder_for(encoder: str | None, head: str | None) -> str | None:
    """``--encoder``, else the encoder ``--head`` was trained with (so a user's head works as it is), else None (the default)."""
    if encoder or not head or head == "bundled":
        return encoder
    from ..pipeline import head_encoder_name

    return head_encoder_name(head)
