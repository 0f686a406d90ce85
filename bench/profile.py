"""Sample a gateway worker with py-spy and say where its time goes, grouped by what the code is.

py-spy writes collapsed stacks (`frame;frame;... count`, which speedscope.app also opens). Own
time is the leaf frame's; time spent inside C extensions (uvloop, httptools, orjson, asyncpg's
protocol) is charged to the Python frame that called into them, so a leaf such as `Runner.run`
is the event loop itself: socket calls, callbacks and HTTP parsing in C.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# First match wins: more specific paths first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logging", ("src/logging_config", "logging/")),
    ("rate limiter", ("src/services/rate_limit", "src/db/limits")),
    ("auth", ("src/security/", "src/db/api_keys", "src/cache")),
    ("middleware", ("src/middleware",)),
    ("tokenizer", ("src/services/tokens", "bpe_openai")),
    ("credits/settlement", ("src/services/credits", "src/db/holds")),
    ("catalog", ("src/services/catalog", "src/db/models")),
    ("providers", ("src/services/providers",)),
    ("chat service", ("src/services/chat", "src/routes/chat", "src/schemas/chat")),
    ("gateway (other)", ("src/",)),
    ("pydantic", ("pydantic",)),
    ("fastapi", ("fastapi/",)),
    ("starlette", ("starlette/",)),
    ("uvicorn", ("uvicorn/",)),
    ("asyncpg", ("asyncpg/",)),
    ("httpx", ("httpx/", "httpcore/", "h11/", "anyio/", "sniffio/")),
    ("redis", ("redis/",)),
    ("JSON", ("json/", "orjson")),
    ("asyncio", ("asyncio/",)),
)
EVENT_LOOP_LEAVES = {"Runner.run", "run_until_complete", "run_forever", "run"}


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, output: Path, *, rate: int = 200) -> str:
    """Sample `pid` for `seconds` into `output` (collapsed stacks); returns py-spy's own summary line."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    done = subprocess.run(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"py-spy failed: {done.stderr.strip() or done.stdout.strip()}")
    lines = [x for x in (done.stdout + done.stderr).splitlines() if "Samples" in x]
    return lines[-1].strip() if lines else ""


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    if match is None:
        return frame, ""
    return match["func"], _short(match["file"])


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def category(func: str, path: str) -> str:
    for name, prefixes in CATEGORIES:
        if any(prefix in path for prefix in prefixes):
            if name == "asyncio" and func in EVENT_LOOP_LEAVES:
                break
            return name
    if func in EVENT_LOOP_LEAVES:
        return "event loop (C: uvloop, httptools, sockets)"
    return "other"


def summarize(path: Path, *, top: int = 15) -> dict[str, Any]:
    """Own time per function and per category, and inclusive time of the gateway's own functions."""
    own: Counter[tuple[str, str]] = Counter()
    by_category: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_parse(f) for f in stack.split(";")]
        func, file = frames[-1]
        own[(func, file)] += count
        by_category[category(func, file)] += count
        for seen in {f for f in frames if f[1].startswith("src/")}:
            inclusive[seen] += count

    def share(count: int) -> float:
        return round(100 * count / total, 1) if total else 0.0

    return {
        "samples": total,
        "top_own": [
            {"function": func, "file": file, "category": category(func, file), "pct": share(count)}
            for (func, file), count in own.most_common(top)
        ],
        "own_by_category": [
            {"category": name, "pct": share(count)} for name, count in by_category.most_common()
        ],
        "inclusive_gateway": [
            {"function": func, "file": file, "pct": share(count)}
            for (func, file), count in inclusive.most_common(25)
        ],
    }


def render(summary: dict[str, Any]) -> str:
    lines = [f"py-spy samples: {summary['samples']}", "", "own time by category:"]
    lines += [f"  {row['pct']:5.1f}%  {row['category']}" for row in summary["own_by_category"]]
    lines += ["", "top functions by own time:"]
    lines += [
        f"  {row['pct']:5.1f}%  {row['function']} ({row['file']}) [{row['category']}]"
        for row in summary["top_own"]
    ]
    lines += ["", "gateway functions by inclusive time:"]
    lines += [
        f"  {row['pct']:5.1f}%  {row['function']} ({row['file']})" for row in summary["inclusive_gateway"]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1]))))
