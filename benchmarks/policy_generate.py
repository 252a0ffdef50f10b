"""Generation throughput of the local transformers policy backend on CPU.

Prints new tokens per second at batch 1 and 8 for the built-in models (default: tiny Idefics3 and tiny
Qwen2.5-VL), each measured in a fresh process so its peak RSS is its own. Every row samples exactly
``--tokens`` new tokens (no stop strings), from an env-like two-image conversation.

    python benchmarks/policy_generate.py                    # tiny models, 64 new tokens
    python benchmarks/policy_generate.py --preset small --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def conversation() -> list[dict]:
    rng = np.random.default_rng(0)
    overview = Image.fromarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8))
    crop = overview.crop((100, 100, 228, 228))
    return [
        {"role": "system", "content": [{"type": "text", "text": "You examine a medical image step by step."}]},
        {"role": "user", "content": [{"type": "image", "image": overview}, {"type": "text", "text": "Nodule?"}]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "text",
                    "text": '<reasoning>x</reasoning><action>{"name": "drill", "box": [1, 2, 3, 4]}</action>',
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "image", "image": crop}, {"type": "text", "text": "<feedback>zoomed</feedback>"}],
        },
    ]


def measure(model_name: str, batches: list[int], tokens: int, repeats: int, threads: int) -> list[dict]:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.agents.policy import SamplingConfig

    backend = TransformersBackend.from_pretrained(model_name)
    sampling = SamplingConfig(temperature=1.0, seed=0, max_new_tokens=tokens, stop=[])
    messages = conversation()
    prompt_tokens = backend.encode([messages])["input_ids"].shape[1]
    rows = []
    for batch in batches:
        start = time.perf_counter()
        backend.generate([messages] * batch, sampling)  # warm-up (first call pays one-off costs)
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = backend.generate([messages] * batch, sampling)
            times.append(time.perf_counter() - start)
        generated = sum(len(o.token_ids) for o in outputs)
        seconds = statistics.median(times)
        rows.append(
            {
                "model": model_name,
                "params": sum(p.numel() for p in backend.model.parameters()),
                "batch": batch,
                "prompt_tokens": prompt_tokens,
                "new_tokens": generated,
                "first_call_s": first,
                "median_s": seconds,
                "tokens_per_s": generated / seconds,
                "threads": torch.get_num_threads(),
            }
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for row in rows:
        row["peak_rss_mb"] = peak_mb
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    parser.add_argument("--archs", default="idefics3,qwen2_5_vl")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, batches, args.tokens, args.repeats, args.threads)))
        return
    rows = []
    for arch in args.archs.split(","):
        name = f"{args.preset}-{arch}"
        command = [sys.executable, __file__, "--worker", name, "--batches", args.batches]
        command += ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.extend(json.loads(result.stdout.strip().splitlines()[-1]))
    header = f"{'model':<22}{'params':>10}{'batch':>6}{'prompt':>8}{'new tok':>9}{'first s':>9}{'median s':>10}"
    header += f"{'tok/s':>9}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<22}{r['params']:>10,}{r['batch']:>6}{r['prompt_tokens']:>8}{r['new_tokens']:>9}"
            f"{r['first_call_s']:>9.3f}{r['median_s']:>10.3f}{r['tokens_per_s']:>9.1f}{r['peak_rss_mb']:>13.0f}"
        )
    load = os.getloadavg()[0]
    print(
        f"torch threads: {rows[0]['threads']}; new tokens per row: {args.tokens} (fewer when a row samples its "
        f"end-of-turn token); median of {args.repeats} runs; 1-min load average before: {load:.2f}"
    )


if __name__ == "__main__":
    main()
