"""Why can the policy not look? Train three candidates on the same phantom images for the same time and compare.

Candidates (each trained from random init for ``--seconds`` per probe, AdamW, batch 32, 1 CPU thread):

- ``cnn``: a plain 4-layer CNN, the reference for what the data allows;
- ``tower``: the policy VLM's own vision tower (SigLIP encoder) with a linear head on its patch features,
  which bypasses the connector and the language model;
- ``vlm``: the policy VLM end to end: image + question in its chat template, the answer as text, loss on
  the answer tokens only (the way the trainer's SFT sees it).

Probes (128 px views, 512 px phantom images of the ``look`` preset: one round object per image):

- ``a``: is a round object visible in the overview? (lesion vs nothing, no mimics);
- ``b``: where is the object? Its box in the overview, as 4 location classes (``<locNN>``, 16 bins per side;
  the ``loc`` box format); scored by hit rate (the object's centre lies inside the predicted box, so a
  drill there shows it) and mean IoU with the object's box;
- ``c``: lesion or mimic, from the drill view of the object (what the drill shows the policy);
- ``c_overview``: lesion or mimic from the overview only (must stay at chance: looking is necessary);
- ``c_scan1`` / ``c_scan5``: lesion or mimic from a scan montage of the object alone, or of the object among
  four other boxes of its size in random order (``--scan-detail``: the environment's ``scan_detail``). With
  ``overview`` tiles both must stay at chance: a scan localises, only a drill tells the two apart.

    python experiments/look_probe.py                         # every candidate and probe, 60 s each
    python experiments/look_probe.py --candidates vlm --probes b --vlm-preset '{"scale_factor": 1}'

Prints a table and writes ``--out`` (JSON lines, one per candidate and probe).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

BINS = 16


@dataclass
class Example:
    """One probe input: a 128 px view, its yes/no label and the object's box (original pixels)."""

    image: Any  # PIL view, 128 px
    label: int  # a, c: 1 = yes; b: unused
    box: tuple[float, float, float, float]  # the object's box in original pixels (b)


def _objects(scene: Any) -> list[Any]:
    return [*scene.lesions, *scene.mimics]


def make_data(
    probe: str,
    n: int,
    split: str,
    view: int,
    seed: int,
    drill_min_side: int = 64,
    phantom: dict | None = None,
    scan_detail: str = "overview",
) -> list[Example]:
    """Render ``n`` examples of ``probe`` from the phantom ``look`` preset."""
    from medeyes_env import views
    from medeyes_env.sources.phantom.config import PRESETS
    from medeyes_env.sources.phantom.source import PhantomSource

    config = PRESETS["look"].model_copy(update={"families": ("presence",), **(phantom or {})})
    if probe == "a":
        config = config.model_copy(update={"distractor_count": (0, 0)})
    source = PhantomSource(config)
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for index in range(n):
        case = source.case(split, index)  # type: ignore[arg-type]
        scene = source.scene(split, index)  # type: ignore[arg-type]
        image = case.load_image()
        objects = _objects(scene)
        label = int(case.answer == "yes")
        if probe in ("a", "b", "c_overview"):
            if probe != "a" and not objects:
                continue
            box = objects[0].box(scene.size) if objects else (0.0, 0.0, 1.0, 1.0)
            out.append(Example(views.overview(image, view), label, box))
        elif probe in ("c_scan1", "c_scan5"):  # a scan montage that shows the object (among others)
            if not objects:
                continue
            box = objects[0].box(scene.size)
            boxes = [tuple(np.asarray(box) + rng.uniform(-12, 12, size=4))]
            side = box[2] - box[0]
            while probe == "c_scan5" and len(boxes) < 5:
                x, y = rng.uniform(0, scene.size - side, size=2)
                boxes.append((x, y, x + side, y + side))
            order = rng.permutation(len(boxes))
            shown, _ = views.scan_view(
                image, [boxes[i] for i in order], view, drill_min_side, "montage", detail=scan_detail
            )
            out.append(Example(shown, label, tuple(box)))
        else:  # c: the drill view of the object, its box jittered like a policy's drill
            box = np.asarray(objects[0].box(scene.size)) + rng.uniform(-12, 12, size=4)
            shown, _ = views.drill_view(image, box.tolist(), view, drill_min_side)
            out.append(Example(shown, label, tuple(objects[0].box(scene.size))))
    return out


def loc_classes(box: tuple[float, float, float, float], size: int = 512) -> list[int]:
    """The four location classes of a box (nearest of BINS + 1 edges per side)."""
    from medeyes_env.protocol import BoxFormat

    text = BoxFormat(kind="loc", bins=BINS).encode(box, (size, size))
    return [int(text[i + 4 : i + 6]) for i in range(1, len(text) - 1, 7)]


def loc_box(classes: list[int], size: int = 512) -> tuple[float, float, float, float]:
    step = size / BINS
    x1, y1, x2, y2 = (c * step for c in classes)
    return (x1, y1, max(x2, x1 + step), max(y2, y1 + step))


def score_boxes(predicted: list[tuple], gold: list[tuple]) -> dict[str, float]:
    from medeyes_env.rewards import box_iou

    hits = [
        p[0] <= (g[0] + g[2]) / 2 <= p[2] and p[1] <= (g[1] + g[3]) / 2 <= p[3]
        for p, g in zip(predicted, gold, strict=True)
    ]
    ious = [box_iou(p, g) for p, g in zip(predicted, gold, strict=True)]
    return {"hit_rate": float(np.mean(hits)), "iou": float(np.mean(ious))}


# ------------------------------------------------------------------------------------------------ candidates


class CNN:
    """The reference: four conv layers; a position-aware linear head for boxes, a max-pooled one for yes/no."""

    def __init__(self, outputs: int, where: bool) -> None:
        import torch.nn as nn

        head = (
            [nn.Flatten(), nn.Linear(32 * 8 * 8, outputs)]
            if where
            else [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, outputs)]
        )
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            *head,
        )  # fmt: skip

    def parameters(self) -> Any:
        """Trainable parameters."""
        return self.net.parameters()

    def inputs(self, examples: list[Example]) -> Any:
        """A batch tensor of the examples' views."""
        import torch

        arrays = np.stack([np.asarray(e.image.convert("RGB"), dtype=np.float32) / 255.0 for e in examples])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2)

    def logits(self, batch: Any) -> Any:
        """Class logits, (B, outputs)."""
        return self.net(batch)


class Tower:
    """The VLM's own vision tower with a linear head on its flattened patch features."""

    def __init__(self, model: Any, processor: Any, outputs: int) -> None:
        import torch.nn as nn

        self.vision = model.model.vision_model
        self.processor = processor
        hidden = model.config.vision_config.hidden_size
        patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        self.head = nn.Linear(hidden * patches, outputs)

    def parameters(self) -> Any:
        """Trainable parameters."""
        return [*self.vision.parameters(), *self.head.parameters()]

    def inputs(self, examples: list[Example]) -> Any:
        """A batch tensor of the examples' views."""
        pixels = self.processor.image_processor([[e.image] for e in examples], return_tensors="pt")["pixel_values"]
        return pixels[:, 0]

    def logits(self, batch: Any) -> Any:
        """Class logits, (B, outputs)."""
        features = self.vision(pixel_values=batch).last_hidden_state  # (B, patches, hidden)
        return self.head(features.flatten(1))


def train_classifier(candidate: Any, train: list[Example], targets: np.ndarray, heads: int, seconds: float, lr: float):
    """Cross-entropy on ``heads`` classification heads (targets: (N, heads)); returns the step count."""
    import torch

    optimizer = torch.optim.AdamW(candidate.parameters(), lr=lr)
    cached = [candidate.inputs(train[i : i + 256]) for i in range(0, len(train), 256)]
    inputs = torch.cat(cached)
    rng = np.random.default_rng(0)
    started, steps = time.perf_counter(), 0
    while (time.perf_counter() - started < seconds) if STEPS["value"] is None else steps < STEPS["value"]:
        pick = rng.integers(0, len(train), 32)
        logits = candidate.logits(inputs[pick]).view(32, heads, -1)
        target = torch.from_numpy(targets[pick]).long()
        loss = torch.nn.functional.cross_entropy(logits.reshape(32 * heads, -1), target.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def predict_classifier(candidate: Any, test: list[Example], heads: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = torch.cat([candidate.logits(candidate.inputs(test[i : i + 128])) for i in range(0, len(test), 128)])
    return logits.view(len(test), heads, -1).argmax(-1).numpy()


class VLMProbe:
    """The whole VLM: chat-templated image + question, answer text, loss on the answer tokens."""

    QUESTIONS: ClassVar[dict[str, str]] = {
        "a": "Is there a round object in the image?",
        "b": "Where is the round object? Give its box.",
        "c": "Is there a lesion?",
        "c_overview": "Is there a lesion?",
        "c_scan1": "Is there a lesion?",
        "c_scan5": "Is there a lesion?",
    }

    def __init__(self, model: Any, processor: Any, probe: str) -> None:
        self.model, self.processor, self.question = model, processor, self.QUESTIONS[probe]
        self.tokenizer = processor.tokenizer

    def encode(self, example: Example, answer: str | None, question: str | None = None) -> tuple[list[int], Any]:
        """Chat-templated ids and pixel values of one example (the generation prompt when ``answer`` is None)."""
        text = question or self.question
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
        out = self.processor(text=[text], images=[[example.image]], return_tensors="pt")
        return out["input_ids"][0].tolist(), out["pixel_values"][0]

    def batch(self, rows: list[tuple[list[int], Any]]) -> tuple[Any, Any, Any]:
        """Right-padded ids, attention mask and stacked pixel values."""
        import torch

        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (length - len(r)) for r, _ in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r, _ in rows])
        pixels = torch.stack([p for _, p in rows])
        return ids, mask, pixels

    def train(
        self,
        train: list[Example],
        answers: list[str],
        seconds: float,
        lr: float,
        vision_lr_mult: float = 1.0,
        extra: list[tuple[Example, str, str]] | None = None,
    ) -> int:
        """Train on (example, answer) pairs, plus ``extra`` (example, answer, question) of another probe."""
        import torch

        prompt_len = len(self.encode(train[0], None)[0])
        rows = [(*self.encode(e, a), prompt_len) for e, a in zip(train, answers, strict=True)]
        for e, a, q in extra or []:
            rows.append((*self.encode(e, a, q), len(self.encode(e, None, q)[0])))
        vision = [p for n, p in self.model.named_parameters() if "vision_model" in n or "connector" in n]
        text = [p for n, p in self.model.named_parameters() if not ("vision_model" in n or "connector" in n)]
        groups = [{"params": text, "lr": lr}, {"params": vision, "lr": lr * vision_lr_mult}]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        rng = np.random.default_rng(0)
        started, steps = time.perf_counter(), 0
        self.model.train()
        while (time.perf_counter() - started < seconds) if STEPS["value"] is None else steps < STEPS["value"]:
            picked = [rows[i] for i in rng.integers(0, len(rows), 32)]
            ids, mask, pixels = self.batch([(r[0], r[1]) for r in picked])
            logprobs = (
                self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, :-1].log_softmax(-1)
            )
            chosen = logprobs.gather(2, ids[:, 1:, None])[..., 0]
            answer_mask = mask[:, 1:].clone()
            for row, (_, _, length) in enumerate(picked):
                answer_mask[row, : length - 1] = 0
            loss = -(chosen * answer_mask).sum() / answer_mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        self.model.eval()
        return steps

    def choose(self, test: list[Example], candidates: list[str]) -> list[int]:
        """Index of the most likely candidate answer per example (scored by summed log-probability)."""
        import torch

        prompt_len = len(self.encode(test[0], None)[0])
        scores = np.zeros((len(test), len(candidates)))
        with torch.no_grad():
            for k, answer in enumerate(candidates):
                for start in range(0, len(test), 64):
                    rows = [self.encode(e, answer) for e in test[start : start + 64]]
                    ids, mask, pixels = self.batch(rows)
                    logits = self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
                    logprobs = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
                    answer_mask = mask[:, 1:].clone()
                    answer_mask[:, : prompt_len - 1] = 0
                    scores[start : start + 64, k] = (logprobs * answer_mask).sum(1).numpy()
        return scores.argmax(1).tolist()

    def generate_digit_boxes(self, test: list[Example], max_tokens: int = 24) -> list[tuple]:
        """Greedy decoding of a ``[x1, y1, x2, y2]`` pixel box; an unparseable one counts as an empty box."""
        import re

        import torch

        prompt = [self.encode(e, None) for e in test]
        boxes: list[tuple] = []
        with torch.no_grad():
            for start in range(0, len(test), 64):
                ids, _, pixels = self.batch(prompt[start : start + 64])
                for _ in range(max_tokens):
                    next_ids = self.model(input_ids=ids, pixel_values=pixels).logits[:, -1].argmax(-1)
                    ids = torch.cat([ids, next_ids[:, None]], dim=1)
                for row in ids[:, len(prompt[start][0]) :]:
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    match = re.search(r"\[\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*\]", text)
                    box = tuple(float(v) for v in match.groups()) if match else (0.0, 0.0, 0.0, 0.0)
                    boxes.append(box)
        return boxes

    def generate_locs(self, test: list[Example]) -> list[list[int]]:
        """Greedy decoding of four location tokens after the generation prompt (plus the separator space)."""
        import torch

        loc_ids = self.tokenizer.convert_tokens_to_ids([f"<loc{i:02d}>" for i in range(BINS + 1)])
        example_ids, _ = self.encode(test[0], "<loc00><loc00><loc00><loc00>")
        prefix_len = len(example_ids) - 4 - self._suffix_len(example_ids, loc_ids)
        out: list[list[int]] = []
        with torch.no_grad():
            for start in range(0, len(test), 64):
                rows = [self.encode(e, "<loc00><loc00><loc00><loc00>") for e in test[start : start + 64]]
                ids, _, pixels = self.batch(rows)
                ids = ids[:, :prefix_len].clone()
                picked = []
                for _ in range(4):
                    logits = self.model(input_ids=ids, pixel_values=pixels).logits[:, -1, loc_ids]
                    choice = logits.argmax(-1)
                    picked.append(choice)
                    ids = torch.cat([ids, torch.tensor(loc_ids)[choice][:, None]], dim=1)
                out.extend(torch.stack(picked, 1).tolist())
        return out

    @staticmethod
    def _suffix_len(ids: list[int], loc_ids: list[int]) -> int:
        last = max(i for i, t in enumerate(ids) if t in loc_ids)
        return len(ids) - 1 - last


# ------------------------------------------------------------------------------------------------ main


def sincos_position_table(patches: int, width: int, scale: float = 1.0) -> Any:
    """A 2D sine-cosine table for a square grid of ``patches`` positions (MAE / ViT style), of std ``scale``.

    Half the channels encode the row, half the column, at geometric frequencies. A random table of std 0.02
    (the default init) is 16x weaker than the patch embeddings at init, so a small vision tower starts with
    almost no sense of where a patch is; boxes must be read from where things are.
    """
    import torch

    side = round(patches**0.5)
    if side * side != patches or width % 4:
        raise ValueError(f"a 2D sin-cos table needs a square grid and a width divisible by 4, got {patches}, {width}")
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return table / table.std() * scale


POS_INIT: dict[str, str | None] = {"value": None}
STEPS: dict[str, int | None] = {"value": None}


def load_vlm(preset_overrides: dict[str, Any], seed: int) -> tuple[Any, Any]:
    """The tiny Idefics3 policy, or a variant of its preset built in memory (random init, same factory)."""
    model, processor = _load_vlm(preset_overrides, seed)
    if POS_INIT["value"] is not None:
        import torch

        table = model.model.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            if POS_INIT["value"] == "sincos":
                table.copy_(sincos_position_table(table.shape[0], table.shape[1]))
            else:
                table.normal_(0.0, float(POS_INIT["value"]))
    return model, processor


def _load_vlm(preset_overrides: dict[str, Any], seed: int) -> tuple[Any, Any]:
    import torch

    from medeyes.models.factory import build_idefics3, load_policy_model
    from medeyes.models.presets import get_preset

    torch.manual_seed(seed)
    if not preset_overrides:
        model, processor = load_policy_model("tiny", device="cpu", dtype="float32")
        return model.float(), processor
    spec = get_preset("idefics3", "tiny").model_copy(update=preset_overrides)
    spec = type(spec).model_validate(spec.model_dump())  # re-run the consistency checks
    model, processor = build_idefics3(spec)
    return model.float(), processor


def run(candidate: str, probe: str, data: dict[str, tuple], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(args.seed)
    train, test = data[probe]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "candidate": candidate,
        "probe": probe,
        "vlm_preset": args.vlm_preset,
        "vlm_lr": args.vlm_lr,
        "vision_lr_mult": args.vision_lr_mult,
        "phantom": args.phantom,
        "drill_min_side": args.drill_min_side,
        "scan_detail": args.scan_detail if probe.startswith("c_scan") else None,
    }
    if probe == "b":
        targets = np.array([loc_classes(e.box) for e in train])
        gold = [e.box for e in test]
        if candidate == "vlm" and args.boxes == "digits":  # the old encoding: pixel numbers, digit by digit
            vlm = VLMProbe(*load_vlm(json.loads(args.vlm_preset), args.seed), probe)
            answers = ["[" + ", ".join(str(round(v)) for v in e.box) + "]" for e in train]
            result["steps"] = vlm.train(train, answers, args.seconds, args.vlm_lr, args.vision_lr_mult)
            result["boxes"] = "digits"
            boxes = vlm.generate_digit_boxes(test)
            result.update(score_boxes(boxes, gold))
            result["distinct_boxes"] = len(set(boxes))
            result["seconds"] = round(time.perf_counter() - started, 1)
            return result
        if candidate == "vlm":
            vlm = VLMProbe(*load_vlm(json.loads(args.vlm_preset), args.seed), probe)
            answers = ["".join(f"<loc{c:02d}>" for c in row) for row in targets]
            result["steps"] = vlm.train(train, answers, args.seconds, args.vlm_lr, args.vision_lr_mult)
            predicted = vlm.generate_locs(test)
        else:
            model = CNN(4 * (BINS + 1), True) if candidate == "cnn" else Tower(*load_vlm({}, args.seed), 4 * (BINS + 1))
            result["steps"] = train_classifier(model, train, targets, 4, args.seconds, args.lr)
            predicted = predict_classifier(model, test, 4).tolist()
        result.update(score_boxes([loc_box(p) for p in predicted], gold))
        result["distinct_boxes"] = len({tuple(p) for p in predicted})
    else:
        labels = np.array([[e.label] for e in train])
        if candidate == "vlm":
            vlm = VLMProbe(*load_vlm(json.loads(args.vlm_preset), args.seed), probe)
            answers = ["yes" if e.label else "no" for e in train]
            extra = []
            if args.mix_where:  # also teach where the object is (overview -> loc tokens), as SFT's boxes do
                where = make_data("b", args.train, "train", 128, 0, args.drill_min_side, json.loads(args.phantom))
                question = VLMProbe.QUESTIONS["b"]
                extra = [(e, "".join(f"<loc{c:02d}>" for c in loc_classes(e.box)), question) for e in where]
                result["mix_where"] = True
            result["steps"] = vlm.train(train, answers, args.seconds, args.vlm_lr, args.vision_lr_mult, extra)
            predicted = 1 - np.array(vlm.choose(test, ["yes", "no"]))
        else:
            model = CNN(2, False) if candidate == "cnn" else Tower(*load_vlm({}, args.seed), 2)
            result["steps"] = train_classifier(model, train, labels, 1, args.seconds, args.lr)
            predicted = predict_classifier(model, test, 1)[:, 0]
        result["accuracy"] = float(np.mean(predicted == np.array([e.label for e in test])))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default="cnn,tower,vlm")
    parser.add_argument("--probes", default="a,b,c,c_overview")
    parser.add_argument("--seconds", type=float, default=60.0, help="Training time per candidate and probe.")
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="cnn and tower learning rate.")
    parser.add_argument("--vlm-lr", type=float, default=3e-3)
    parser.add_argument("--vlm-preset", default="{}", help="JSON overrides of the tiny Idefics3 preset.")
    parser.add_argument("--vision-lr-mult", type=float, default=1.0, help="vlm: vision tower + connector lr factor.")
    parser.add_argument("--mix-where", action="store_true", help="vlm, yes/no probes: also train on probe b.")
    parser.add_argument("--boxes", choices=["loc", "digits"], default="loc", help="vlm, probe b: box encoding.")
    parser.add_argument("--pos-init", default=None, help="vlm/tower: re-initialise vision position embeddings.")
    parser.add_argument("--steps", type=int, default=None, help="Train a fixed number of steps instead of seconds.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drill-min-side", type=int, default=64, help="Smallest region a drill shows (env).")
    parser.add_argument("--phantom", default="{}", help="JSON overrides of the phantom look preset.")
    parser.add_argument("--scan-detail", choices=["overview", "full"], default="overview", help="c_scan* tiles.")
    parser.add_argument("--out", default=None, help="Append one JSON line per result here.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    POS_INIT["value"] = args.pos_init
    STEPS["value"] = args.steps
    probes = args.probes.split(",")
    data: dict[str, tuple] = {}
    for probe in probes:
        data[probe] = tuple(
            make_data(probe, n, split, 128, seed, args.drill_min_side, json.loads(args.phantom), args.scan_detail)
            for n, split, seed in ((args.train, "train", 0), (args.test, "test", 1))
        )
    rows = []
    for probe in probes:
        for candidate in args.candidates.split(","):
            row = run(candidate, probe, data, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print("\n| probe | candidate | steps | accuracy | hit rate | IoU | distinct boxes |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row.get(k) for k in ("accuracy", "hit_rate", "iou", "distinct_boxes")]
        text = " | ".join("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells)
        print(f"| {row['probe']} | {row['candidate']} | {row['steps']} | {text} |")


if __name__ == "__main__":
    main()
