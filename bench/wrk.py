"""Drive load with wrk (Debian's `wrk`) and bench/wrk.lua; the result has the Python generator's shape."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.loadgen import LoadResult

SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
# wrk's own duration only has to outlast the threads' deadlines (see wrk.lua).
GRACE_SECONDS = 3


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: bytes,
    *,
    connections: int,
    duration: float,
    keys: list[str] | None = None,
    stream_body: bytes | None = None,
    stream_every: int = 0,
    timeout: float = 60.0,
) -> LoadResult:
    """Closed-loop load with one wrk thread per connection; latencies come as wrk's percentiles."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        stream_file = Path(tmp) / "stream.json"
        stream_file.write_bytes(stream_body or body)
        env = {
            **os.environ,
            "BENCH_DURATION": str(duration),
            "BENCH_BODY": str(body_file),
            "BENCH_STREAM_BODY": str(stream_file),
            "BENCH_STREAM_EVERY": str(stream_every if stream_body else 0),
            "BENCH_KEYS": ",".join(keys or []),
        }
        command = [
            "wrk",
            "-t",
            str(connections),
            "-c",
            str(connections),
            "-d",
            f"{int(duration) + GRACE_SECONDS}s",
            "--timeout",
            f"{int(timeout)}s",
            "-s",
            str(SCRIPT),
            url,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line.removeprefix("BENCH_RESULT "))
    errors = {name: data[name] for name in ("connect", "read", "write", "timeout") if data[name]}
    if data["bad"]:
        errors["bad_response"] = data["bad"]
    result = LoadResult(
        ok=data["ok"],
        errors=errors,
        elapsed=data["elapsed"],
        cpu_seconds=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        generator="wrk",
        fixed_ms={name: data[f"{name}_us"] / 1000 for name in ("p50", "p90", "p99", "max", "mean")},
    )
    return result
