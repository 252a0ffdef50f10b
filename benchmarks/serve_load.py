"""Load on ``medeyes serve``: N concurrent WebSocket sessions against in-process stepping, in one run.

The server runs in its own process (``medeyes serve`` on 127.0.0.1, a free port); N async
``MedEyesClient`` sessions in this process each play E episodes of the same four-turn script
(reset, scan 2 regions, drill, answer). The baseline plays the same episodes in-process with
``MedEyesEnv`` (one process, no network, no PNG). Every served episode is checked against the
in-process one with the same seed: same case, same reward; a missing one is "lost", a mismatch
"crossed". Latency is per message (reset or step) as the client sees it, PNG decode not included.

The server runs with ``--timings``: around each served row the benchmark reads ``GET /medeyes/timings``
and reports the share of the server process's CPU seconds spent in PNG encoding and in the env's reset
and step (each counted in its session thread's CPU time), and the server's CPU seconds per wall second.

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
from collections.abc import Callable
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


def in_process(seeds: list[int], group: int = 1) -> tuple[dict[int, tuple[str, float]], list[float], float]:
    """Play every seed's episode ``group`` times in-process; return {seed: (case_id, reward)}, step latencies, wall s.

    Latencies are of steps only: a reset on a new case renders a phantom (about 60 ms), which says
    nothing about the server. Episodes per second include the resets, served and in-process alike.
    """
    env = gym.make("MedEyes/Phantom-v0").unwrapped
    env.reset(seed=seeds[0])  # warm-up: renders and caches the first case
    results, latencies = {}, []
    start = time.perf_counter()
    for seed in seeds:
        for _ in range(group):  # a GRPO group: G rollouts of one case, one after the other
            _, info = env.reset(seed=seed)
            for text in SCRIPT:
                t0 = time.perf_counter()
                _, reward, *_ = env.step(text)
                latencies.append(time.perf_counter() - t0)
        results[seed] = (info["case_id"], reward)
    return results, latencies, time.perf_counter() - start


def kernel_seconds(pid: int) -> float:
    """CPU seconds a process has spent in the kernel (page faults, socket calls), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")  # stime, field 15 of stat


def timings(url: str) -> dict:
    """The server's time totals (``GET /medeyes/timings``, served with ``--timings``)."""
    response = httpx.get(url + "/medeyes/timings", timeout=10)
    response.raise_for_status()
    return response.json()


def server_shares(before: dict, after: dict, wall: float) -> dict[str, float]:
    """Shares of the server's CPU seconds between two timing snapshots: PNG encoding, env reset, env step."""
    cpu = after["process_cpu_s"] - before["process_cpu_s"]

    def part(name: str) -> float:
        return after["parts"][name]["cpu_s"] - before["parts"][name]["cpu_s"]

    return {
        "server_cpu_s": cpu,
        "server_cores": cpu / wall,
        "png_share": part("png_encode") / cpu,
        "env_reset_share": part("env_reset") / cpu,
        "env_step_share": part("env_step") / cpu,
        "png_ms_per_call": 1000 * part("png_encode") / max(1, _calls(after, before, "png_encode")),
    }


def _calls(after: dict, before: dict, name: str) -> int:
    return after["parts"][name]["calls"] - before["parts"][name]["calls"]


async def served(
    url: str, sessions: int, episodes: int, pid: int, group: int = 1
) -> tuple[dict[tuple[int, int], tuple[str, float]], list[float], float, dict[str, float]]:
    """Play sessions x episodes over the socket, concurrently; as in_process, plus the server's time shares.

    Sessions come in groups of ``group`` that play the same seeds at once (a GRPO group's G rollouts of a case);
    results are keyed by ``(seed, session)``.
    """
    results: dict[tuple[int, int], tuple[str, float]] = {}
    latencies: list[float] = []

    async def session(index: int) -> None:
        async with MedEyesClient(url) as env:
            await env.reset(seed=0)  # warm-up: connect, and build the session's env, off the clock
            warmed.append(index)
            await ready.wait()
            for episode in range(episodes):
                seed = index // group * episodes + episode
                first = await env.reset(seed=seed)
                for text in SCRIPT:
                    t0 = time.perf_counter()
                    last = await env.step(text)
                    latencies.append(time.perf_counter() - t0)
                results[seed, index] = (first.observation.case_id, last.reward)

    ready, warmed = asyncio.Event(), []
    tasks = [asyncio.create_task(session(i)) for i in range(sessions)]
    while len(warmed) < sessions and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    before, kernel = timings(url), kernel_seconds(pid)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    shares = server_shares(before, timings(url), wall)
    shares["kernel_share"] = (kernel_seconds(pid) - kernel) / shares["server_cpu_s"]
    return results, latencies, wall, shares


def start_server(max_sessions: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "medeyes.cli.app", "serve", "--port", str(port)]
    # --eval: real case ids on the wire (without it they are opaque), so each episode is checked by its case.
    command += ["--max-sessions", str(max_sessions), "--idle-timeout", "0", "--eval", "--timings"]
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


def png_options(seeds: list[int], repeats: int = 5) -> list[dict]:
    """Encode the views of ``seeds``' scripted episodes each way (best of ``repeats``): ms per view, bytes, exact?

    The server's way (:func:`~medeyes_env.serving.wire.encode_image`: PNG level 1, one channel when grey)
    beside PNG level 0 (stored, no compression), PIL's default level 6, and the raw bytes in base64 (no PNG).
    Exact means the client decodes the same pixels as the in-process view.
    """
    import base64
    import io

    from PIL import Image

    from medeyes_env.serving.wire import DATA_URL_PREFIX, decode_image, encode_image

    def one_channel(view: np.ndarray) -> Image.Image:  # what encode_image compresses: L when the view is grey
        grey = (view[..., 0] == view[..., 1]).all() and (view[..., 1] == view[..., 2]).all()
        return Image.fromarray(np.ascontiguousarray(view[..., 0]) if grey else view)

    env = gym.make("MedEyes/Phantom-v0").unwrapped
    pixels = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        pixels.append(obs["image"])
        pixels += [env.step(text)[0]["image"] for text in SCRIPT]

    def png(level: int) -> Callable[[np.ndarray], str]:
        def encode(view: np.ndarray) -> str:
            buffer = io.BytesIO()
            one_channel(view).save(buffer, format="PNG", compress_level=level)
            return DATA_URL_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")

        return encode

    def raw(view: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(np.asarray(one_channel(view)))).decode("ascii")

    def raw_pixels(text: str, view: np.ndarray) -> np.ndarray:
        width, height = one_channel(view).size
        sent = np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(height, width, -1)
        return np.asarray(Image.fromarray(sent[..., 0] if sent.shape[2] == 1 else sent).convert("RGB"))

    ways = [("PNG level 1 (served)", encode_image), ("PNG level 0", png(0)), ("PNG level 6", png(6)), ("raw", raw)]
    rows = []
    for name, encode in ways:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            texts = [encode(view) for view in pixels]
            best = min(best, time.perf_counter() - start)
        decoded = [
            raw_pixels(t, v) if name == "raw" else np.asarray(decode_image(t).convert("RGB"))
            for t, v in zip(texts, pixels, strict=True)
        ]
        exact = all(np.array_equal(d, v) for d, v in zip(decoded, pixels, strict=True))
        rows.append(
            {
                "way": name,
                "ms_per_view": 1000 * best / len(pixels),
                "kb_per_view": sum(map(len, texts)) / len(pixels) / 1000,
                "exact": exact,
            }
        )
    return rows


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32], help="concurrent sessions per row")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per session")
    parser.add_argument("--group", type=int, default=1, help="sessions that play the same seeds at once (GRPO's G)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    load_before = os.getloadavg()

    server, url = start_server(max(args.sessions))
    rows = []
    try:
        for n in args.sessions:
            group = min(args.group, n)
            seeds = list(range(-(-n // group) * args.episodes))
            expected, base_lat, base_wall = in_process(seeds, group)
            got, lat, wall, shares = asyncio.run(served(url, n, args.episodes, server.pid, group))
            played = [(index // group * args.episodes + e, index) for index in range(n) for e in range(args.episodes)]
            lost = sum(key not in got for key in played)
            crossed = sum(key in got and got[key] != expected[key[0]] for key in played)
            rss, peak = rss_mb(server.pid)
            rows.append(
                {
                    "sessions": n,
                    "episodes": len(played),
                    "group": group,
                    "served_eps_per_s": len(got) / wall,
                    "in_process_eps_per_s": len(seeds) * group / base_wall,
                    "served_p50_ms": ms(lat, 50),
                    "served_p99_ms": ms(lat, 99),
                    "in_process_p50_ms": ms(base_lat, 50),
                    "in_process_p99_ms": ms(base_lat, 99),
                    "server_rss_mb": rss,
                    "server_peak_rss_mb": peak,
                    "client_rss_mb": rss_mb(os.getpid())[0],
                    "lost": lost,
                    "crossed": crossed,
                    **shares,
                }
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    load = f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    grouping = f", sessions in groups of {args.group} on the same seeds" if args.group > 1 else ""
    table = Table(
        title=f"medeyes serve under load: {args.episodes} episodes per session, 4 messages each{grouping} ({load})"
    )
    for column in (
        "sessions",
        "episodes/s served (in-proc, ratio)",
        "step p50 ms (in-proc)",
        "step p99 ms (in-proc)",
        "server RSS MB (peak)",
        "server CPU: PNG / env reset / env step (cores busy)",
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
            f"{r['png_share']:.1%} / {r['env_reset_share']:.1%} / {r['env_step_share']:.1%} ({r['server_cores']:.2f})",
            f"{r['lost']} / {r['crossed']}",
        )
    console = Console(width=180)
    console.print(table)
    views = png_options(list(range(4)))
    png_table = Table(title="the same views encoded each way (16 views of 4 scripted episodes, best of 5)")
    for column in ("encoding", "ms per view", "kB on the wire per view (base64)", "client gets the same pixels"):
        png_table.add_column(column, justify="right")
    for r in views:
        png_table.add_row(r["way"], f"{r['ms_per_view']:.2f}", f"{r['kb_per_view']:.1f}", "yes" if r["exact"] else "NO")
    console.print(png_table)
    print(f"in-process baseline: one MedEyesEnv in this process, client RSS {rows[-1]['client_rss_mb']:.0f} MB")
    if args.json:
        print(json.dumps({"rows": rows, "png_options": views}, indent=1))
    if any(r["lost"] or r["crossed"] for r in rows):
        sys.exit("lost or crossed sessions: see the table")


if __name__ == "__main__":
    main()
