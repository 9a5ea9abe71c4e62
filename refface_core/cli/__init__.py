"""The `refface` command line (also `python -m refface_core`): a thin dispatcher. Each command's arguments and run
function sit in a module of their own here, which imports what the command drives only when it runs, so that
`refface --help` and argument errors answer at once."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import RefFaceError
from . import album, bench, comfy_queue, convert, degrade, download, eval, faces, restore, train, video

COMMANDS = (restore, album, video, download, convert, faces, degrade, train, eval, bench, comfy_queue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refface", description="Reference-guided face restoration.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    terminate = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # unwinds like Ctrl-C: temporary files are removed
    try:
        return args.run(args)
    except RefFaceError as e:
        print(f"refface: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("refface: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("refface: interrupted", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminate)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as on Ctrl-C."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated
