"""Training throughput and MFU of a larger preset on one GPU (the H200 device check of issue 5).

Builds a random-weight model of a size preset with the project's factory (default ``idefics3/large``,
SmolVLM-500M-shaped), records real expert (GRN + CVS) trajectories on the phantom benchmark, tokenises them
with the trainer's own :func:`~medeyes.models.episodes.tokenize_episode`, then runs the trainer's SFT
update (forward with ``logits_to_keep``, token-mean NLL, backward, AdamW) for ``--seconds`` and reports:

- training tokens/s (every token of every sequence, images expanded), and MFU = model FLOPs/s over the
  peak (``--peak-tflops``, default 790 bf16 dense, the figure the issue quotes for an H200);
- ``generate`` new tokens/s at batch 8 and 64 on the same model (the issue: at scale, generation is the cost).

Model FLOPs per step (PaLM appendix B convention, forward + backward = 3x forward): ``6 * N_text * T_text +
12 * L * d * T_text * T_mean / 2`` for the causal language model (``T_text`` tokens, ``T_mean`` the mean
sequence length) plus ``6 * N_vision * P`` for the vision encoder over its ``P`` patches. Activation
recomputation (``--grad-checkpointing``) is not counted (model FLOPs, not hardware FLOPs).

    python benchmarks/gpu_train_mfu.py                                # GPU: large preset, 180 s, bf16
    python benchmarks/gpu_train_mfu.py --device cpu --preset tiny --seconds 5 --gen-batches 2   # smoke run

Prints a table and writes JSON (``--out``, default ``docs/gpu_train_mfu.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def expert_episodes(processor: Any, n_cases: int, max_steps: int) -> list[Any]:
    """Real GRN + CVS trajectories on phantom train cases, tokenised exactly as the SFT stage does."""
    from medeyes.agents.expert.agent import ExpertAgent
    from medeyes.agents.expert.config import ExpertConfig
    from medeyes.models.episodes import tokenize_record
    from medeyes.rollout import RolloutConfig, run_rollout
    from medeyes.trajectories import MemoryStore
    from medeyes_env.env import EnvConfig
    from medeyes_env.sources import open_cases

    source = open_cases("phantom", {"image_size": 1024})
    store = MemoryStore()
    agent = ExpertAgent("annotation", ExpertConfig(n_expert=2, t_max=max_steps))
    result = run_rollout(
        agent,
        source,
        RolloutConfig(split="train", n=n_cases, samples_per_case=2, env=EnvConfig(max_steps=max_steps)),
        store=store,
    )
    return [tokenize_record(record, store, processor, is_expert=True) for record in result.records]


def parameter_counts(model: Any) -> tuple[int, int]:
    """(language-model parameters without the input embedding, vision encoder + connector parameters)."""
    vision = sum(p.numel() for name, p in model.named_parameters() if "vision" in name or "connector" in name)
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total - vision - embed, vision


def count_patches(batch: Any, patch_size: int) -> int:
    """Vision patches in a batch: real (non-padding) images x patches per image."""
    pixels = batch.image_inputs.get("pixel_values")
    if pixels is None:
        return 0
    if pixels.dim() == 5:  # Idefics3: [B, n_img, 3, H, W], all-zero images are padding
        real = int((pixels.flatten(2).abs().sum(-1) > 0).sum())
        return real * (pixels.shape[-1] // patch_size) * (pixels.shape[-2] // patch_size)
    return int(pixels.shape[0])  # Qwen: one row per patch


def train_throughput(model: Any, episodes: list[Any], args: argparse.Namespace, pad_id: int) -> dict[str, float]:
    """Timed SFT updates for ``args.seconds`` after ``args.warmup`` untimed ones."""
    import numpy as np
    import torch

    from medeyes.models.episodes import collate
    from medeyes.training.logprobs import masked_token_logprobs
    from medeyes.training.objective import sft_loss

    device = torch.device(args.device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else torch.autocast(device.type, enabled=False)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n_text, n_vision = parameter_counts(model)
    text_config = model.config.get_text_config()
    layers, width = text_config.num_hidden_layers, text_config.hidden_size
    patch = model.config.vision_config.patch_size
    rng = np.random.default_rng(0)
    model.train()
    tokens = flops = steps = 0
    started = None
    while True:
        picked = [episodes[i] for i in rng.choice(len(episodes), size=args.batch, replace=len(episodes) < args.batch)]
        batch = collate(picked, pad_id).to(device)
        with autocast:
            logprobs, _ = masked_token_logprobs(model, batch, torch.bfloat16 if args.bf16 else None)
            loss = sft_loss(logprobs, batch.loss_mask[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            tokens = flops = 0
            continue
        if started is None:
            continue
        lengths = batch.attention_mask.sum(dim=1).float()
        text_tokens = float(lengths.sum())
        flops += 6 * n_text * text_tokens + 12 * layers * width * text_tokens * float(lengths.mean()) / 2
        flops += 6 * n_vision * count_patches(batch, patch)
        tokens += text_tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= args.seconds:
            break
    timed_steps = steps - args.warmup
    out = {
        "steps": timed_steps,
        "seconds": elapsed,
        "tokens_per_second": tokens / elapsed,
        "model_tflops_per_second": flops / elapsed / 1e12,
        "mfu": flops / elapsed / (args.peak_tflops * 1e12),
        "mean_sequence_tokens": tokens / max(1, timed_steps * args.batch),
        "params_text": n_text,
        "params_vision": n_vision,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def generation_throughput(model: Any, processor: Any, args: argparse.Namespace) -> list[dict[str, float]]:
    """``generate`` new tokens/s on phantom overview prompts, exactly ``--gen-tokens`` new tokens per row."""
    import torch

    from medeyes.agents.backends.transformers import TransformersBackend
    from medeyes.agents.policy import SamplingConfig
    from medeyes_env.env import EnvConfig, MedEyesEnv

    backend = TransformersBackend(model, processor, device=args.device)
    env = MedEyesEnv("phantom", config=EnvConfig(max_steps=2))
    rows = []
    model.eval()
    for batch_size in args.gen_batch_sizes[: args.gen_batches]:
        conversations = []
        for seed in range(batch_size):
            env.reset(seed=seed)
            conversations.append(env.unwrapped.chat_messages())
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.gen_tokens, stop=[], seed=0)
        backend.generate(conversations[:1], sampling.model_copy(update={"max_new_tokens": 2}))  # warm up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16):
            outputs = backend.generate(conversations, sampling)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        new_tokens = sum(len(o.token_ids or []) for o in outputs)
        rows.append(
            {
                "batch": batch_size,
                "new_tokens": new_tokens,
                "seconds": seconds,
                "tokens_per_second": new_tokens / seconds,
            }
        )
    return rows


def main() -> None:
    """Build, record, train, generate; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="idefics3", choices=["idefics3", "qwen2_5_vl"])
    parser.add_argument("--preset", default="large")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=180.0, help="Timed training wall time.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed training steps first.")
    parser.add_argument("--batch", type=int, default=16, help="Trajectories per training step.")
    parser.add_argument("--cases", type=int, default=64, help="Phantom train cases to record expert trajectories on.")
    parser.add_argument("--max-steps", type=int, default=4, help="T_max of the recorded trajectories.")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast.")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="Peak dense bf16 TFLOP/s of the device.")
    parser.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--gen-batches", type=int, default=2, help="How many of --gen-batch-sizes to run.")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu_train_mfu.json")
    args = parser.parse_args()

    import torch
    import transformers

    from medeyes.models.factory import build_tiny_model, load_policy_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu for a smoke run")
    with tempfile.TemporaryDirectory(prefix="medeyes-mfu-") as tmp:
        started = time.perf_counter()
        path = build_tiny_model(args.arch, args.preset, out_dir=Path(tmp) / "model", seed=0)
        model, processor = load_policy_model(str(path), device=args.device, dtype="float32")
        build_seconds = time.perf_counter() - started
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    started = time.perf_counter()
    episodes = expert_episodes(processor, args.cases, args.max_steps)
    record_seconds = time.perf_counter() - started
    train = train_throughput(model, episodes, args, int(processor.tokenizer.pad_token_id))
    generation = generation_throughput(model, processor, args)
    result = {
        "arch": args.arch,
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bf16": args.bf16,
        "grad_checkpointing": args.grad_checkpointing,
        "batch": args.batch,
        "episodes": len(episodes),
        "build_seconds": build_seconds,
        "record_seconds": record_seconds,
        "train": train,
        "generate": generation,
        "peak_tflops": args.peak_tflops,
    }
    print(f"{args.arch}/{args.preset} on {result['device']} (torch {torch.__version__}, bf16 {args.bf16})")
    print(
        f"parameters: text {train['params_text'] / 1e6:.1f}M, vision {train['params_vision'] / 1e6:.1f}M; "
        f"{len(episodes)} expert episodes, mean {train['mean_sequence_tokens']:.0f} tokens"
    )
    print("| measure | value |\n|---|---|")
    print(f"| training tokens/s | {train['tokens_per_second']:,.0f} |")
    print(f"| model TFLOP/s | {train['model_tflops_per_second']:.2f} |")
    print(f"| MFU (of {args.peak_tflops:.0f} TFLOP/s) | {train['mfu']:.3f} |")
    for row in generation:
        print(f"| generate, batch {row['batch']}: new tokens/s | {row['tokens_per_second']:,.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
