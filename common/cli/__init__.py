"""The `hemex` command: one subcommand per user task (parser.py), each a thin call into `common/`
(commands.py, federation.py)."""

from __future__ import annotations

import signal
import sys
import threading

from common.cli.parser import build_parser
from common.errors import HemexError


class Terminated(BaseException):
    """SIGTERM (a job scheduler, `timeout`, systemd), raised like Ctrl-C so that every `finally`
    runs: a simulation stops its SuperLink and simulation runtime instead of leaving them running."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args)
    except HemexError as err:
        print(f"hemex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hemex {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"hemex {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

