"""The gateway benchmark: `python -m bench.run` (see bench/README.md).

It starts the fake upstream (and measures its ceiling), a fresh PostgreSQL database, the gateway as
production starts it, a user with a key made through the operator API, then drives each scenario
from separate processes: first straight at the upstream, then through the gateway on the full
product path (key, rate limit, hold, upstream call, settlement, usage record). It prints a table,
writes a JSON file and checks the ledger against the counted requests.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
from cryptography.fernet import Fernet

from bench import ledger, procs
from bench import profile as profiler
from bench import upstream as fake
from bench import wrk as wrk_runner
from bench.gateway import ROOT, Gateway
from bench.loadgen import LoadResult, Template, http_request, run_load
from src import db_config

STARTING_CREDITS = Decimal("1000000")
# What one successful request costs with the fake upstream's prices and usage (markup 1).
UNIT_COST = Decimal(fake.PROMPT_TOKENS) * Decimal("0.000001") + Decimal(fake.COMPLETION_TOKENS) * Decimal(
    "0.000002"
)
CHAT_PATH = "/v1/chat/completions"
HUGE = str(10**12)


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    stream: bool = False
    slow: bool = False
    workers: int | None = None  # None: --workers
    log_level: str = "WARNING"
    note: str = ""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("nonstream-1", 1),
        Scenario("nonstream-16", 16),
        Scenario("nonstream-64", 64),
        Scenario("stream-1", 1, stream=True),
        Scenario("stream-16", 16, stream=True),
        Scenario("slow50-64", 64, slow=True, note="upstream answers after 50 ms"),
        Scenario("nonstream-64-info", 64, log_level="INFO", note="LOG_LEVEL=INFO, as production logs"),
        Scenario("nonstream-64-2w", 64, workers=2, note="two workers"),
        Scenario("slow50-64-2w", 64, slow=True, workers=2, note="50 ms upstream, two workers"),
    )
}


def request_body(*, slow: bool, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": fake.SLOW_MODEL if slow else fake.FAST_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "Write one short sentence about load testing."},
        ],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark the gateway.")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per gateway scenario")
    parser.add_argument(
        "--direct-duration", type=float, default=5.0, help="seconds of each direct-to-upstream run"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each scenario")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated, from: " + ", ".join(SCENARIOS),
    )
    parser.add_argument(
        "--redis", metavar="URL", help="also run every scenario with REDIS_URL (FLUSHDB first)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a PostgreSQL server to create the benchmark database on (default: DATABASE_URL, else embedded)",
    )
    parser.add_argument(
        "--soak-minutes", type=float, default=0.0, help="soak length (0: none; 10 for the full soak)"
    )
    parser.add_argument("--soak-connections", type=int, default=16)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="SECONDS", help="sample a worker with py-spy under load"
    )
    parser.add_argument("--profile-connections", type=int, default=64, help="connections while profiling")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--users", type=int, default=1, help="users (one key each) the load is spread over")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument(
        "--gateway-module",
        default="scripts.serve",
        help="start the gateway with `python -m MODULE` (to compare a patched start)",
    )
    parser.add_argument("--json", type=Path, help="output file (default bench/results/<timestamp>.json)")
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios.split(",") if s and s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    return args


def _tool(name: str) -> str:
    return shutil.which(name) or name


def git_commit() -> str:
    done = subprocess.run(
        [_tool("git"), "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        [_tool("git"), "status", "--porcelain", "--", "src", "supabase"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def uptime() -> str:
    return subprocess.run([_tool("uptime")], capture_output=True, text=True, check=False).stdout.strip()


def cpu_probe() -> float:
    """Seconds one core takes for ten million iterations of a pure-Python loop (best of three
    runs of a million, scaled). Shared and virtual machines change speed over minutes; rows taken
    at different probe values are not comparable, and figures scale roughly with it."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 10, 3)


def _ms(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def summary(result: LoadResult) -> dict[str, Any]:
    return {
        "generator": result.generator,
        "ok": result.ok,
        "errors": result.errors,
        "elapsed_s": round(result.elapsed, 3),
        "rps": round(result.rps, 1),
        "p50_ms": _ms(result.latency(50)),
        "p90_ms": _ms(result.latency(90)),
        "p99_ms": _ms(result.latency(99)),
        "ttfb_p50_ms": _ms(result.ttfb(50)),
        "ttfb_p90_ms": _ms(result.ttfb(90)),
        "ttfb_p99_ms": _ms(result.ttfb(99)),
        "generator_cpu_ms_per_request": round(1000 * result.cpu_seconds / result.ok, 4)
        if result.ok
        else None,
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


@dataclass
class Upstream:
    process: subprocess.Popen[str]
    port: int

    @classmethod
    def start(cls) -> Upstream:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", "0", "--slow-ms", "50"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError("the fake upstream did not start")
        return cls(process=process, port=int(line[1]))

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds([self.process.pid, *procs.children(self.process.pid)])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class Bench:
    args: argparse.Namespace
    upstream: Upstream
    admin_dsn: str
    dsn: str
    stamp: str
    log_dir: Path
    keys: list[str] = field(default_factory=list)
    expected_success: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    admin_key: str = field(default_factory=lambda: "gw_admin_" + secrets.token_urlsafe(32))
    # Kept for the whole run: the keys made at the first start must work after every restart.
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    encryption_keys: str = field(default_factory=lambda: Fernet.generate_key().decode())

    # -- load ---------------------------------------------------------------------------------

    def use_wrk(self, stream: bool) -> bool:
        """wrk for plain JSON when it is installed; streams need the time to first byte, which wrk lacks."""
        if self.args.loadgen == "python" or stream:
            return False
        if self.args.loadgen == "wrk" and not wrk_runner.available():
            raise SystemExit("--loadgen wrk: wrk is not on PATH (apt-get install wrk)")
        return wrk_runner.available()

    def load(
        self,
        port: int,
        *,
        connections: int,
        duration: float,
        slow: bool = False,
        stream: bool = False,
        keys: list[str] | None = None,
        stream_every: int = 0,
    ) -> LoadResult:
        body = request_body(slow=slow, stream=stream)
        stream_body = request_body(slow=slow, stream=True) if stream_every else None
        if self.use_wrk(stream):
            return wrk_runner.run_wrk(
                f"http://127.0.0.1:{port}{CHAT_PATH}",
                body,
                connections=connections,
                duration=duration,
                keys=keys,
                stream_body=stream_body,
                stream_every=stream_every,
            )
        templates = []
        key_list: list[str | None] = list(keys) if keys else [None]
        for index in range(len(key_list) * max(stream_every, 1)):
            key = key_list[index % len(key_list)]
            is_stream = stream or (stream_every > 0 and index % stream_every == stream_every - 1)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            raw = http_request(
                "127.0.0.1", port, CHAT_PATH, stream_body if is_stream and stream_body else body, headers
            )
            templates.append(Template(raw=raw, stream=is_stream))
        return run_load("127.0.0.1", port, templates, connections=connections, duration=duration)

    # -- ceilings -----------------------------------------------------------------------------

    def ceilings(self) -> dict[str, Any]:
        """The fake upstream's own ceiling, as each load generator sees it: far above the gateway's."""
        found: dict[str, Any] = {}
        port = self.upstream.port
        runs: list[tuple[str, bool, int, str]] = [
            ("python", False, 64, "nonstream-64"),
            ("python", True, 16, "stream-16"),
        ]
        if wrk_runner.available() and self.args.loadgen != "python":
            runs.insert(0, ("wrk", False, 64, "nonstream-64"))
        for generator, stream, connections, label in runs:
            cpu_before = self.upstream.cpu_seconds()
            if generator == "wrk":
                result = wrk_runner.run_wrk(
                    f"http://127.0.0.1:{port}{CHAT_PATH}",
                    request_body(slow=False, stream=False),
                    connections=connections,
                    duration=3,
                )
            else:
                templates = [
                    Template(
                        raw=http_request(
                            "127.0.0.1", port, CHAT_PATH, request_body(slow=False, stream=stream), {}
                        ),
                        stream=stream,
                    )
                ]
                result = run_load("127.0.0.1", port, templates, connections=connections, duration=3)
            cpu = self.upstream.cpu_seconds() - cpu_before
            entry = summary(result)
            entry["upstream_cpu_ms_per_request"] = round(1000 * cpu / result.ok, 4) if result.ok else None
            found[f"{generator} {label}"] = entry
            print(
                f"  upstream ceiling, {generator:6s} {label:13s}: {result.rps:9.0f} req/s"
                f"  p50 {entry['p50_ms']} ms  errors {result.error_count}"
                f"  (generator {entry['generator_cpu_ms_per_request']} CPU ms/req,"
                f" upstream {entry['upstream_cpu_ms_per_request']} CPU ms/req)",
                flush=True,
            )
        return found

    # -- the gateway --------------------------------------------------------------------------

    def gateway_env(self, *, redis_url: str | None, log_level: str) -> dict[str, str]:
        base = {
            name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if name in os.environ
        }
        env = {
            **base,
            "APP_ENV": "production",
            "DATABASE_URL": self.dsn,
            "SECRET_KEY": self.secret_key,
            "ENCRYPTION_KEYS": self.encryption_keys,
            "ADMIN_API_KEY": self.admin_key,
            "CUSTOM_PROVIDER_BASE_URL": f"http://127.0.0.1:{self.upstream.port}/v1",
            "CUSTOM_PROVIDER_NAME": "bench",
            "LOG_LEVEL": log_level,
            "SHUTDOWN_GRACE_SECONDS": "5",
            "GATEWAY_DATA_DIR": str(ROOT / ".gatewayz" / "bench"),
            "DEFAULT_RPM": HUGE,
            "DEFAULT_RPD": HUGE,
            "DEFAULT_TPM": HUGE,
            "DEFAULT_TPD": HUGE,
            "DEFAULT_CONCURRENCY": "100000",
            "PYTHONUNBUFFERED": "1",
        }
        if redis_url:
            env["REDIS_URL"] = redis_url
        for item in self.args.gateway_env:
            name, _, value = item.partition("=")
            env[name] = value
        return env

    def start_gateway(self, *, workers: int, redis_url: str | None, log_level: str, label: str) -> Gateway:
        gateway = Gateway(
            env=self.gateway_env(redis_url=redis_url, log_level=log_level),
            workers=workers,
            port=fake.free_port(),
            log_path=self.log_dir / f"gateway-{label}.log",
            module=self.args.gateway_module,
        )
        gateway.start()
        if not self.keys:
            self.keys = [self.create_user(gateway, index) for index in range(self.args.users)]
        return gateway

    def create_user(self, gateway: Gateway, index: int) -> str:
        response = httpx.post(
            gateway.url + "/admin/users",
            headers={"Authorization": f"Bearer {self.admin_key}"},
            json={
                "email": f"bench-{self.stamp.lower()}-{index}@example.com",
                "credits": str(STARTING_CREDITS),
            },
            timeout=30,
        )
        if response.status_code != 201:
            raise RuntimeError(f"POST /admin/users answered {response.status_code}: {response.text}")
        key: str = response.json()["api_key"]
        return key

    # -- one scenario -------------------------------------------------------------------------

    def scenario(self, scenario: Scenario, gateway: Gateway, phase: str) -> dict[str, Any]:
        conns, slow, stream = scenario.connections, scenario.slow, scenario.stream
        label = f"{scenario.name}{'+redis' if phase == 'redis' else ''}"
        probe = cpu_probe()
        print(f"\n[{label}] {uptime()}; cpu probe {probe} s", flush=True)
        before = ledger.usage_counts(self.dsn)
        warm = self.load(
            gateway.port,
            connections=conns,
            duration=self.args.warmup,
            slow=slow,
            stream=stream,
            keys=self.keys,
        )
        direct = self.load(
            self.upstream.port,
            connections=conns,
            duration=self.args.direct_duration,
            slow=slow,
            stream=stream,
        )
        rss_start = gateway.rss_mib()
        cpu_before, up_before = gateway.cpu_seconds(), self.upstream.cpu_seconds()
        pg_before = procs.cpu_by_pid(procs.postgres_pids())
        ticks_before = procs.machine_ticks()
        load1 = os.getloadavg()[0]
        result = self.load(
            gateway.port,
            connections=conns,
            duration=self.args.duration,
            slow=slow,
            stream=stream,
            keys=self.keys,
        )
        cpu = gateway.cpu_seconds() - cpu_before
        up_cpu = self.upstream.cpu_seconds() - up_before
        pg_cpu = procs.cpu_used(pg_before, procs.cpu_by_pid(procs.postgres_pids()))
        busy = procs.busy_share(ticks_before, procs.machine_ticks())
        rss_end = gateway.rss_mib()
        time.sleep(0.2)
        after = ledger.usage_counts(self.dsn)
        counted = warm.ok + result.ok
        self.expected_success += counted
        recorded = after.success - before.success
        gw, dr = summary(result), summary(direct)
        row = {
            "scenario": scenario.name,
            "phase": phase,
            "redis": phase == "redis",
            "workers": scenario.workers or self.args.workers,
            "log_level": scenario.log_level,
            "connections": conns,
            "stream": stream,
            "upstream_latency_ms": 50 if slow else 0,
            "note": scenario.note,
            "cpu_probe_s": probe,
            "gateway": gw,
            "direct": dr,
            "warmup": summary(warm),
            "added_ms": {
                "p50": _minus(gw["p50_ms"], dr["p50_ms"]),
                "p90": _minus(gw["p90_ms"], dr["p90_ms"]),
                "p99": _minus(gw["p99_ms"], dr["p99_ms"]),
                "ttfb_p50": _minus(gw["ttfb_p50_ms"], dr["ttfb_p50_ms"]),
            },
            "gateway_cpu_ms_per_request": round(1000 * cpu / result.ok, 3) if result.ok else None,
            "upstream_cpu_ms_per_request": round(1000 * up_cpu / result.ok, 3) if result.ok else None,
            "postgres_cpu_ms_per_request_all_databases": round(1000 * pg_cpu / result.ok, 3)
            if result.ok
            else None,
            "machine_busy_pct": round(100 * busy, 1),
            "load1_at_start": round(load1, 2),
            "rss_mib_start": [round(x, 1) for x in rss_start],
            "rss_mib_end": [round(x, 1) for x in rss_end],
            "anon_mib_end": [round(x, 1) for x in gateway.anon_mib()],
            "errors": result.error_count + warm.error_count,
            "ledger": {
                "counted_success": counted,
                "recorded_success": recorded,
                "recorded_other": after.other - before.other,
                "exact": recorded == counted and after.other == before.other,
            },
        }
        self.rows.append(row)
        print(render_rows([row]), flush=True)
        return row

    # -- soak ---------------------------------------------------------------------------------

    def soak(self, gateway: Gateway, minutes: float) -> dict[str, Any]:
        """Mixed load (every fourth connection streams) with the workers' RSS every minute."""
        seconds = minutes * 60
        conns = self.args.soak_connections
        print(
            f"\n[soak] {minutes:g} min, {conns} connections (1 in 4 streaming); {uptime()};"
            f" cpu probe {cpu_probe()} s",
            flush=True,
        )
        holder: dict[str, LoadResult] = {}
        before = ledger.usage_counts(self.dsn)

        def drive() -> None:
            holder["result"] = self.load(
                gateway.port, connections=conns, duration=seconds, keys=self.keys, stream_every=4
            )

        thread = threading.Thread(target=drive, daemon=True)
        started = time.monotonic()
        samples: list[dict[str, Any]] = []
        last_count, last_at = before.success, started
        thread.start()
        minute = 0
        while True:
            # Once a minute, and once more when the load has ended.
            finished = not thread.is_alive()
            counts = ledger.usage_counts(self.dsn)
            now = time.monotonic()
            rate = (counts.success - last_count) / (now - last_at) if samples else None
            sample = {
                "minute": round((now - started) / 60, 2),
                "rss_mib": [round(x, 1) for x in gateway.rss_mib()],
                "anon_mib": [round(x, 1) for x in gateway.anon_mib()],
                "req_per_s_since_last_sample": round(rate, 1) if rate is not None else None,
                "load1": round(os.getloadavg()[0], 2),
            }
            samples.append(sample)
            print(
                f"  soak minute {sample['minute']:6.2f}: RSS {sample['rss_mib']} MiB"
                f" (anon {sample['anon_mib']}), {sample['req_per_s_since_last_sample']} req/s,"
                f" load {sample['load1']}",
                flush=True,
            )
            last_count, last_at = counts.success, now
            if finished:
                break
            minute += 1
            thread.join(max(0.0, started + 60 * minute - time.monotonic()))
        result = holder["result"]
        time.sleep(0.2)
        after = ledger.usage_counts(self.dsn)
        self.expected_success += result.ok
        workers = len(samples[0]["rss_mib"])
        tail = [s for s in samples if s["minute"] >= samples[-1]["minute"] - 5]
        slopes = [
            _slope([s["minute"] for s in tail], [s["rss_mib"][w] for s in tail]) for w in range(workers)
        ]
        return {
            "minutes": minutes,
            "connections": conns,
            "load": summary(result),
            "errors": result.error_count,
            "samples": samples,
            "rss_slope_mib_per_min_last_5": [round(x, 3) for x in slopes],
            "ledger": {
                "counted_success": result.ok,
                "recorded_success": after.success - before.success,
                "exact": after.success - before.success == result.ok and after.other == before.other,
            },
        }

    # -- profile ------------------------------------------------------------------------------

    def profile(self, gateway: Gateway, seconds: int) -> dict[str, Any]:
        if profiler.py_spy() is None:
            return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
        conns = self.args.profile_connections
        output = self.log_dir / f"profile-nonstream-{conns}.txt"
        print(
            f"\n[profile] py-spy on worker {gateway.worker_pids()[0]} for {seconds} s"
            f" under nonstream-{conns}",
            flush=True,
        )
        holder: dict[str, LoadResult] = {}

        def drive() -> None:
            holder["result"] = self.load(
                gateway.port, connections=conns, duration=seconds + 5, keys=self.keys
            )

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        time.sleep(2.5)
        line = profiler.record(gateway.worker_pids()[0], seconds, output)
        thread.join()
        self.expected_success += holder["result"].ok
        found = profiler.summarize(output)
        found["raw"] = str(output)
        found["py_spy"] = line
        found["load_while_profiled"] = summary(holder["result"])
        print(profiler.render(found), flush=True)
        return found


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    ("scenario", 24),
    ("conns", 5),
    ("gen", 6),
    ("req/s", 8),
    ("p50", 7),
    ("p90", 7),
    ("p99", 7),
    ("direct p50", 10),
    ("added p50", 9),
    ("ttfb p50", 8),
    ("added ttfb", 10),
    ("CPU ms/req", 10),
    ("RSS start>end MiB", 17),
    ("errors", 6),
    ("ledger", 6),
    ("probe s", 7),
)


def render_rows(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(
            "  ".join(
                name.rjust(width) if i else name.ljust(width) for i, (name, width) in enumerate(COLUMNS)
            )
        )
        lines.append("-" * len(lines[0]))
    for row in rows:
        gw, dr, added = row["gateway"], row["direct"], row["added_ms"]
        rss = f"{max(row['rss_mib_start'], default=0):.0f}>{max(row['rss_mib_end'], default=0):.0f}"
        if len(row["rss_mib_end"]) > 1:
            rss += f" x{len(row['rss_mib_end'])}"
        name = row["scenario"] + ("+redis" if row["redis"] else "")
        values = [
            name,
            row["connections"],
            gw["generator"],
            _fmt(gw["rps"], 0),
            _fmt(gw["p50_ms"]),
            _fmt(gw["p90_ms"]),
            _fmt(gw["p99_ms"]),
            _fmt(dr["p50_ms"]),
            _fmt(added["p50"]),
            _fmt(gw["ttfb_p50_ms"]),
            _fmt(added["ttfb_p50"]),
            _fmt(row["gateway_cpu_ms_per_request"]),
            rss,
            row["errors"],
            "exact" if row["ledger"]["exact"] else "WRONG",
            _fmt(row.get("cpu_probe_s")),
        ]
        lines.append(
            "  ".join(
                str(v).rjust(width) if i else str(v).ljust(width)
                for i, (v, (_, width)) in enumerate(zip(values, COLUMNS, strict=True))
            )
        )
    return "\n".join(lines)


EMBEDDED_DIR = ROOT / ".gatewayz" / "bench-postgres"


def resolve_admin_dsn(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    print(f"no --database-url / DATABASE_URL: starting the embedded PostgreSQL in {EMBEDDED_DIR}", flush=True)
    return db_config.start_embedded_server(EMBEDDED_DIR)


def flush_redis(url: str) -> None:
    from redis import Redis

    client = Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def run_phases(bench: Bench, chosen: list[Scenario], report: dict[str, Any]) -> list[str]:
    """Every scenario without Redis, then with it; one gateway start per worker count and log level."""
    args = bench.args
    phases: list[tuple[str, str | None]] = [("no-redis", None)]
    if args.redis:
        phases.append(("redis", args.redis))
    base = (args.workers, "WARNING")
    problems: list[str] = []
    for phase, redis_url in phases:
        if redis_url:
            flush_redis(redis_url)
        groups: dict[tuple[int, str], list[Scenario]] = {}
        for scenario in chosen:
            groups.setdefault((scenario.workers or args.workers, scenario.log_level), []).append(scenario)
        if phase == "no-redis" and (args.soak_minutes or args.profile) and base not in groups:
            groups[base] = []
        for (workers, level), scenarios in groups.items():
            label = f"{phase}-w{workers}-{level.lower()}"
            gateway = bench.start_gateway(workers=workers, redis_url=redis_url, log_level=level, label=label)
            try:
                rss_fresh = gateway.rss_mib()
                for scenario in scenarios:
                    bench.scenario(scenario, gateway, phase)
                    bench.rows[-1]["rss_mib_fresh_gateway"] = rss_fresh
                if phase == "no-redis" and (workers, level) == base:
                    if args.profile:
                        report["profile"] = bench.profile(gateway, args.profile)
                    if args.soak_minutes:
                        report["soak"] = bench.soak(gateway, args.soak_minutes)
            finally:
                gateway.stop()
                problems += [f"{label}: {line}" for line in gateway.log_problems()]
        if redis_url:
            flush_redis(redis_url)
    return problems


def print_report(report: dict[str, Any], json_path: Path) -> None:
    meta = report["meta"]
    print("\n" + "=" * 40 + " results " + "=" * 40)
    print(f"commit {meta['commit']}; start: {meta['uptime_at_start']}; end: {meta['uptime_at_end']}")
    print(render_rows(report["scenarios"]))
    if "soak" in report:
        soak = report["soak"]
        print(
            f"\nsoak {soak['minutes']:g} min: {soak['load']['rps']} req/s, errors {soak['errors']},"
            f" ledger {'exact' if soak['ledger']['exact'] else 'WRONG'}"
        )
        for sample in soak["samples"]:
            print(
                f"  minute {sample['minute']:6.2f}: RSS {sample['rss_mib']} MiB (anon {sample['anon_mib']})"
                f"  {sample['req_per_s_since_last_sample']} req/s"
            )
        print(f"  RSS slope over the last five minutes: {soak['rss_slope_mib_per_min_last_5']} MiB/min")
    problems = report["gateway_log_problems"]
    if problems:
        print(f"\ngateway log: {len(problems)} error line(s), first: {problems[0][:300]}")
    check = report["ledger"]
    print(f"\nledger: {'PASS' if check['pass'] else 'FAIL'}")
    for item in check["checks"]:
        print(
            f"  {'ok  ' if item['ok'] else 'FAIL'} {item['check']}:"
            f" expected {item['expected']}, found {item['found']}"
        )
    print(f"\nJSON: {json_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results_dir = ROOT / "bench" / "results"
    log_dir = results_dir / f"{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.json or results_dir / f"{stamp}.json"
    chosen = [SCENARIOS[name] for name in args.scenarios.split(",") if name]
    meta = {
        "started": stamp,
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "uptime_at_start": uptime(),
        "python": sys.version.split()[0],
        "wrk": wrk_runner.available(),
        "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "database_url"
        },
        "unit_cost": str(UNIT_COST),
    }
    print(f"gatewayz benchmark {stamp} on commit {meta['commit']}, {meta['cpus']} CPUs")
    print(f"machine: {meta['uptime_at_start']}")
    admin_dsn = resolve_admin_dsn(args)
    db_name = f"gatewayz_bench_{stamp.lower()}"
    dsn = ledger.create_database(admin_dsn, db_name)
    upstream = Upstream.start()
    bench = Bench(args=args, upstream=upstream, admin_dsn=admin_dsn, dsn=dsn, stamp=stamp, log_dir=log_dir)
    report: dict[str, Any] = {"meta": meta}
    try:
        print(f"fake upstream on port {upstream.port}; its ceiling first:", flush=True)
        report["upstream_ceiling"] = bench.ceilings()
        problems = run_phases(bench, chosen, report)
        time.sleep(0.5)
        report["scenarios"] = bench.rows
        report["gateway_log_problems"] = problems[:50]
        report["ledger"] = ledger.check(
            dsn,
            expected_success=bench.expected_success,
            unit_cost=UNIT_COST,
            starting_credits=STARTING_CREDITS,
        )
    finally:
        upstream.stop()
        meta["uptime_at_end"] = uptime()
        report.setdefault("scenarios", bench.rows)
        if not args.keep_database:
            ledger.drop_database(admin_dsn, db_name)
            if not args.database_url:
                db_config.stop_embedded_server(EMBEDDED_DIR)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_report(report, json_path)
    return 0 if report["ledger"]["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
