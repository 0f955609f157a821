"""How every entry point ends: our errors as one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from pipeline.errors import ModelhashError
from pipeline.settings import redact

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def guarded(main: Callable[[], int], prog: str = "modelhash") -> int:
    """Run `main`; a ModelhashError, or an OSError of the machine's (a report folder that cannot be made, a
    full disk), prints `prog: error: <one line>` and exits 2; Ctrl-C exits 130.

    SIGTERM (`ray job stop`, a Kubernetes pod shutdown) is taken as Ctrl-C, so a crawl commits its work.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return main()
    except (ModelhashError, OSError) as exc:
        print(f"{prog}: error: {' '.join(redact(str(exc)).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED


def warn_no_models(source: str, consequence: str, prog: str = "modelhash") -> None:
    """An empty source is most often a mistyped path: say so on stderr, and what came of it."""
    from pipeline.refs import CHECKPOINT_SUFFIXES

    print(f"{prog}: warning: no models found in {source} (a model is a folder holding a checkpoint: "
          f"{', '.join(CHECKPOINT_SUFFIXES)}); {consequence}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def job_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    command: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """`python -m jobs.<name>`: the job's flags (the same as its `modelhash` subcommand's), then its command."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: command(args), prog)
