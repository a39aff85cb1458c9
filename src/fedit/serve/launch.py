"""Start ``fedit serve`` as a child process and wait until it answers (tests, benchmarks,
scripts that evaluate or judge against a served model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m fedit serve ARGS --port P`` on 127.0.0.1; ``url`` answers once created.

    The server's output goes to ``log`` (a file); ``stop()`` ends it (SIGINT, then kill)
    and returns that output. Also a context manager.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 timeout: float = 180, log: Path | None = None) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.gettempdir()) / f"fedit-serve-{self.port}.log"
        cmd = [sys.executable, "-m", "fedit", "serve", *args, "--port", str(self.port)]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:  # wait for the port to answer, not for a fixed time
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedit serve exited ({self.proc.returncode}): "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"fedit serve did not answer within {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
