"""Load on ``medeyes serve``: N concurrent WebSocket sessions against in-process stepping, in one run.

The server runs in its own process (``medeyes serve`` on 127.0.0.1, a free port); N async
``MedEyesClient`` sessions in this process each play E episodes of the same four-turn script
(reset, scan 2 regions, drill, answer). The baseline plays the same episodes in-process with
``MedEyesEnv`` (one process, no network, no PNG). Every served episode is checked against the
in-process one with the same seed: same case, same reward; a missing one is "lost", a mismatch
"crossed". Latency is per message (reset or step) as the client sees it, PNG decode not included.

Run: ``python benchmarks/serve_load.py [--sessions 1 8 32] [--episodes 4] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

import medeyes_env  # noqa: F401  (registers the ids)
from medeyes_env.serving.client import MedEyesClient

SCAN = (
    '<reasoning>two zones</reasoning><action>{"name": "scan", "boxes": [[100, 200, 400, 500], [600, 200, 900, 500]]}'
    "</action>"
)
DRILL = '<reasoning>the dense one</reasoning><action>{"name": "drill", "box": [400, 400, 600, 600]}</action>'
ANSWER = "<reasoning>seen</reasoning><answer>no</answer>"
SCRIPT = (SCAN, DRILL, ANSWER)


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def in_process(seeds: list[int]) -> tuple[dict[int, tuple[str, float]], list[float], float]:
    """Play every seed's episode in-process; return {seed: (case_id, reward)}, step latencies, wall seconds.

    Latencies are of steps only: a reset on a new case renders a phantom (about 60 ms), which says
    nothing about the server. Episodes per second include the resets, served and in-process alike.
    """
    env = gym.make("MedEyes/Phantom-v0").unwrapped
    env.reset(seed=seeds[0])  # warm-up: renders and caches the first case
    results, latencies = {}, []
    start = time.perf_counter()
    for seed in seeds:
        _, info = env.reset(seed=seed)
        for text in SCRIPT:
            t0 = time.perf_counter()
            _, reward, *_ = env.step(text)
            latencies.append(time.perf_counter() - t0)
        results[seed] = (info["case_id"], reward)
    return results, latencies, time.perf_counter() - start


async def served(url: str, sessions: int, episodes: int) -> tuple[dict[int, tuple[str, float]], list[float], float]:
    """Play sessions x episodes over the socket, concurrently; same return as in_process."""
    results: dict[int, tuple[str, float]] = {}
    latencies: list[float] = []

    async def session(index: int) -> None:
        async with MedEyesClient(url) as env:
            await env.reset(seed=0)  # warm-up: connect, and build the session's env, off the clock
            warmed.append(index)
            await ready.wait()
            for episode in range(episodes):
                seed = index * episodes + episode
                first = await env.reset(seed=seed)
                for text in SCRIPT:
                    t0 = time.perf_counter()
                    last = await env.step(text)
                    latencies.append(time.perf_counter() - t0)
                results[seed] = (first.observation.case_id, last.reward)

    ready, warmed = asyncio.Event(), []
    tasks = [asyncio.create_task(session(i)) for i in range(sessions)]
    while len(warmed) < sessions and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    return results, latencies, time.perf_counter() - start


def start_server(max_sessions: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "medeyes.cli.app", "serve", "--port", str(port)]
    # --eval: real case ids on the wire (without it they are opaque), so each episode is checked by its case.
    command += ["--max-sessions", str(max_sessions), "--idle-timeout", "0", "--eval"]
    env = {k: v for k, v in os.environ.items() if k != "MEDEYES_SERVE_TOKEN"}
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("medeyes serve did not come up within 60 s")


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32], help="concurrent sessions per row")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per session")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()

    server, url = start_server(max(args.sessions))
    rows = []
    try:
        for n in args.sessions:
            seeds = list(range(n * args.episodes))
            expected, base_lat, base_wall = in_process(seeds)
            got, lat, wall = asyncio.run(served(url, n, args.episodes))
            lost = sum(seed not in got for seed in seeds)
            crossed = sum(seed in got and got[seed] != expected[seed] for seed in seeds)
            rss, peak = rss_mb(server.pid)
            rows.append(
                {
                    "sessions": n,
                    "episodes": len(seeds),
                    "served_eps_per_s": len(got) / wall,
                    "in_process_eps_per_s": len(seeds) / base_wall,
                    "served_p50_ms": ms(lat, 50),
                    "served_p99_ms": ms(lat, 99),
                    "in_process_p50_ms": ms(base_lat, 50),
                    "in_process_p99_ms": ms(base_lat, 99),
                    "server_rss_mb": rss,
                    "server_peak_rss_mb": peak,
                    "client_rss_mb": rss_mb(os.getpid())[0],
                    "lost": lost,
                    "crossed": crossed,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    table = Table(title=f"medeyes serve under load: {args.episodes} episodes per session, 4 messages each")
    for column in (
        "sessions",
        "episodes/s served (in-proc, ratio)",
        "step p50 ms (in-proc)",
        "step p99 ms (in-proc)",
        "server RSS MB (peak)",
        "lost / crossed",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["sessions"]),
            f"{r['served_eps_per_s']:.1f} ({r['in_process_eps_per_s']:.1f}, "
            f"{r['served_eps_per_s'] / r['in_process_eps_per_s']:.2f}x)",
            f"{r['served_p50_ms']:.1f} ({r['in_process_p50_ms']:.1f})",
            f"{r['served_p99_ms']:.1f} ({r['in_process_p99_ms']:.1f})",
            f"{r['server_rss_mb']:.0f} ({r['server_peak_rss_mb']:.0f})",
            f"{r['lost']} / {r['crossed']}",
        )
    Console(width=140).print(table)
    print(f"in-process baseline: one MedEyesEnv in this process, client RSS {rows[-1]['client_rss_mb']:.0f} MB")
    if args.json:
        print(json.dumps(rows, indent=1))
    if any(r["lost"] or r["crossed"] for r in rows):
        sys.exit("lost or crossed sessions: see the table")


if __name__ == "__main__":
    main()
