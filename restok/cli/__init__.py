"""The ``restok`` command line: one module per command over shared argument groups (restok.cli.common).

Every command returns an exit code; errors are one line on stderr (see EXIT_CODES, also in --help):
0 success, 1 a check or quality gate failed, 2 bad input or artifacts, 3 environment or OS error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 70 an internal error (a bug). SIGTERM is handled like
Ctrl-C: staging folders are removed and outputs stay as they were (``restok serve`` drains instead).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import traceback
import zipfile

from restok.cli.common import (EXIT_BUG, EXIT_CODES, EXIT_ENV, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, CLIError,
                               check_output_file)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from restok.cli import bench, build, calibrate, check, export, generate, loadtest, sample, serve, train

    parser = argparse.ArgumentParser(
        prog="restok",
        description="ResTok + HAR: export the generator and tokenizer, generate images, check parity, benchmark "
                    "backends, build TensorRT engines, calibrate, train.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items())
               + ". Run 'restok COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in (export, generate, check, bench, build, calibrate, serve, sample, loadtest):
        mod.add_parser(sub)
    train.add_parsers(sub)
    return parser


def _os_message(e: OSError) -> str:
    path = e.filename or ""
    what = {errno.EACCES: "permission denied: check the folder's permissions or choose another path",
            errno.EPERM: "operation not permitted: check the folder's permissions or choose another path",
            errno.ENOSPC: "no space left on the device: free space or choose another disk",
            errno.EDQUOT: "disk quota exceeded: free space or choose another disk",
            errno.EROFS: "read-only file system: choose a writable path",
            errno.ENOENT: "no such file or folder",
            errno.ENOTDIR: "a part of the path is not a folder",
            errno.EISDIR: "is a folder, not a file"}.get(e.errno, e.strerror or str(e))
    if e.strerror and e.errno and e.strerror != os.strerror(e.errno):
        what = e.strerror  # restok's own message for this error (e.g. check_writable's)
    return f"{path}: {what}" if path else what


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds like Ctrl-C (staging folders removed)."""


@contextlib.contextmanager
def _sigterm_unwinds():
    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _printable_streams() -> None:
    """A path or class name that the terminal's encoding cannot show is escaped, never an error after the work."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


def _bad_input(e: BaseException) -> bool:
    """Errors that mean the user's data or URL is wrong, wherever they are raised."""
    if isinstance(e, (zipfile.BadZipFile, EOFError)):
        return True
    name, module = type(e).__name__, type(e).__module__
    return (module.startswith("PIL") and name == "DecompressionBombError") or \
        (module.startswith("httpx") and name in ("UnsupportedProtocol", "InvalidURL", "LocalProtocolError"))


def _environment(e: BaseException) -> bool:
    """An unreachable server or a network failure: the environment, not restok."""
    return type(e).__module__.startswith(("httpx", "httpcore"))


def main(argv: list[str] | None = None) -> int:
    from restok.tensorrt.builder import EngineError
    from restok.manifest import ArtifactError
    from restok.tensorrt.cuda import CudaError

    _printable_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"restok {args.command}"
    try:
        with _sigterm_unwinds():
            check_output_file(getattr(args, "json", None), out_folder=getattr(args, "out", None))
            return int(args.func(args))
    except BaseException as e:  # noqa: BLE001 — every error becomes one line and an exit code
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        code, msg = _classify(e)
        if code in (EXIT_ENV, EXIT_BUG) and os.environ.get("RESTOK_DEBUG"):
            traceback.print_exc()
        print(f"{name}: {msg}", file=sys.stderr)
        return code


def _classify(e: BaseException) -> tuple[int, str]:
    """The exit code of an error (the table in EXIT_CODES) and its one line."""
    from restok.manifest import ArtifactError
    from restok.tensorrt.builder import EngineError
    from restok.tensorrt.cuda import CudaError

    if isinstance(e, Terminated):
        return EXIT_TERMINATED, "terminated (SIGTERM); outputs are as they were before the command"
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, (CLIError, ArtifactError, ValueError, EngineError, FileNotFoundError, NotADirectoryError,
                      IsADirectoryError, FileExistsError)):
        return EXIT_USAGE, "error: " + (_os_message(e) if isinstance(e, OSError) and e.filename else str(e))
    if _bad_input(e):
        return EXIT_USAGE, f"error: bad input: {type(e).__name__}: {e}"
    if _environment(e):
        return EXIT_ENV, f"error: {type(e).__name__}: {e or 'network error'} (is the server running and reachable?)"
    if isinstance(e, (OSError, ImportError, MemoryError, CudaError)):
        msg = _os_message(e) if isinstance(e, OSError) else (str(e) or type(e).__name__)
        return EXIT_ENV, "error: " + (f"out of memory: {msg}" if isinstance(e, MemoryError) else msg)
    return EXIT_BUG, (f"internal error: {type(e).__name__}: {e} (set RESTOK_DEBUG=1 for the traceback; "
                      "please report it)")


if __name__ == "__main__":
    sys.exit(main())
