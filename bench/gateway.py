"""The gateway under test: started as in production (`python -m scripts.serve`), watched through /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from bench import procs

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Gateway:
    env: dict[str, str]
    workers: int
    port: int
    log_path: Path
    module: str = "scripts.serve"
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 90.0) -> None:
        env = {
            **self.env,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(self.workers),
        }
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Until /health answers 20 times in a row with every worker up."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        answered = 0
        while answered < 20:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not start within {timeout:.0f} s; see {self.log_path}")
            try:
                ok = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and len(self.worker_pids()) == self.workers:
                answered += 1
            else:
                answered = 0
                time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's spawned workers, or the server itself."""
        assert self.process is not None
        if self.workers == 1:
            return [self.process.pid]
        return [pid for pid in procs.children(self.process.pid) if "spawn_main" in procs.cmdline(pid)]

    def all_pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *procs.children(self.process.pid)]

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds(self.all_pids())

    def rss_mib(self) -> list[float]:
        return [rss for pid in self.worker_pids() if (rss := procs.rss_mib(pid)) is not None]

    def anon_mib(self) -> list[float]:
        """Each worker's private anonymous memory (RssAnon): RSS without shared, file-backed pages."""
        found = [procs.memory_mib(pid) for pid in self.worker_pids()]
        return [m["RssAnon"] for m in found if m and "RssAnon" in m]

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode

    def log_problems(self) -> list[str]:
        """Lines at ERROR or above (or tracebacks) the gateway wrote."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        markers = ('"level":"ERROR"', '"level":"CRITICAL"', "Traceback", " ERROR ")
        return [line for line in text.splitlines() if any(m in line for m in markers)]
