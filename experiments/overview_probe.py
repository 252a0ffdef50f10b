"""Can the tiny VLM read a question's answer from the overview alone? A plain supervised probe.

No environment, no tools, no format to learn: one user turn (the 128 px overview + the question), the
answer as the assistant turn, cross-entropy on the answer tokens only, AdamW, batch 16. Held-out accuracy
scores every answer seen in training by its log-likelihood and picks the best (so format plays no part).

It separates "the model cannot see it" from "the training pipeline drowns it": in docs/training.md the
modality family is learned here in 100 steps, while presence stays at chance even for large high-contrast
lesions without mimics, which is why the embedded default's presence accuracy does not rise.

    python experiments/overview_probe.py --family modality
    python experiments/overview_probe.py --family presence --options '{"lesion_radius": [28, 40],
        "lesion_contrast": [0.3, 0.4], "distractor_count": [0, 0]}'
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    """Train the probe and print held-out accuracy every ``--eval-every`` steps."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--family", default="modality")
    parser.add_argument("--options", default='{"lesion_radius": [20.0, 36.0]}', help="PhantomConfig fields (JSON).")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--view", type=int, default=128, help="Overview side in pixels (the default's view_size).")
    args = parser.parse_args()

    import torch

    from medeyes.models.factory import load_policy_model
    from medeyes_env.sources import open_cases

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, processor = load_policy_model(args.model, device="cpu", dtype="float32")
    options = {"families": [args.family], "image_size": 512, **json.loads(args.options)}
    source = open_cases("phantom:easy", options)

    def item(split: str, index: int) -> tuple:
        case = source.case(split, index)
        return case.load_image().convert("RGB").resize((args.view, args.view)), case.question, case.answer

    train = [item("train", i) for i in range(600)]
    test = [item("test", i) for i in range(128)]
    answers = sorted({answer for _, _, answer in train})

    def encode(batch: list[tuple], with_answer: bool = True) -> dict:
        texts, images = [], []
        for image, question, answer in batch:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            if with_answer:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
            texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_answer))
            images.append([image])
        return processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")

    def evaluate() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for image, question, answer in test:
                prompt_len = encode([(image, question, answer)], with_answer=False)["input_ids"].shape[1]
                scores = []
                for candidate in answers:
                    inputs = encode([(image, question, candidate)])
                    logprobs = model(**inputs).logits[0, :-1].log_softmax(-1)
                    ids = inputs["input_ids"][0, 1:]
                    scores.append(logprobs.gather(1, ids[:, None])[prompt_len - 1 :, 0].sum().item())
                correct += answers[int(np.argmax(scores))] == answer
        model.train()
        return correct / len(test)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    started = time.time()
    print(f"{args.family}: {len(answers)} distinct answers; step 0 held-out accuracy {evaluate():.3f}")
    for step in range(1, args.steps + 1):
        batch = [train[j] for j in rng.integers(0, len(train), 16)]
        inputs = encode(batch)  # left-padded: every row's answer ends at the last position
        answer_lengths = [
            encode([example])["input_ids"].shape[1] - encode([example], with_answer=False)["input_ids"].shape[1]
            for example in batch
        ]
        length = inputs["input_ids"].shape[1]
        positions = torch.arange(length)[None, :]
        mask = positions >= torch.tensor([length - n for n in answer_lengths])[:, None]  # the answer tokens
        logprobs = model(**inputs).logits[:, :-1].log_softmax(-1)
        picked = logprobs.gather(2, inputs["input_ids"][:, 1:, None])[..., 0]
        loss = -(picked * mask[:, 1:]).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            accuracy = evaluate()
            seconds = time.time() - started
            print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
