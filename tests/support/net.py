"""Network helpers for tests that start real servers or process groups."""

import socket


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
