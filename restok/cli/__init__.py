"""The ``restok`` command line: one module per command over shared argument groups (restok.cli.common).

Every command returns an exit code; errors are one line on stderr (see EXIT_CODES, also in --help):
0 success, 1 a check or quality gate failed, 2 bad input or artifacts, 3 environment or OS error,
130 interrupted, 70 an internal error (a bug).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from restok.cli.common import EXIT_BUG, EXIT_CODES, EXIT_ENV, EXIT_INTERRUPTED, EXIT_USAGE, CLIError

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
    return f"{path}: {what}" if path else what


def main(argv: list[str] | None = None) -> int:
    from restok.tensorrt.builder import EngineError
    from restok.manifest import ArtifactError
    from restok.tensorrt.cuda import CudaError

    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"restok {args.command}"
    try:
        return int(args.func(args))
    except (CLIError, ArtifactError, ValueError, EngineError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, FileExistsError) as e:
        msg = _os_message(e) if isinstance(e, OSError) and e.filename else str(e)
        print(f"{name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ImportError, MemoryError, CudaError) as e:
        if os.environ.get("RESTOK_DEBUG"):
            traceback.print_exc()
        msg = _os_message(e) if isinstance(e, OSError) else (str(e) or type(e).__name__)
        if isinstance(e, MemoryError):
            msg = f"out of memory: {msg}"
        print(f"{name}: error: {msg}", file=sys.stderr)
        return EXIT_ENV
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: one line, the traceback on request
        if os.environ.get("RESTOK_DEBUG"):
            traceback.print_exc()
        print(f"{name}: internal error: {type(e).__name__}: {e} (set RESTOK_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
