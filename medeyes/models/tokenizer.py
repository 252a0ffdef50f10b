r"""A byte-level BPE tokenizer trained offline on the MedEyes protocol and phantom-question vocabulary.

The tiny models need a tokenizer that (a) encodes ANY text (byte-level, so no unknown tokens), (b) spends
its small vocabulary on what the policy actually reads and writes: the ``<reasoning>``/``<action>``/
``<answer>`` tags, JSON boxes with pixel coordinates, anatomy words, yes/no, and the chat template's role
words, and (c) carries the special tokens its architecture needs (Idefics3: ``<image>``,
``<fake_token_around_image>``, ``<global-img>``, the 36 ``<row_i_col_j>`` tile tags,
``<end_of_utterance>``; Qwen2.5-VL: ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|image_pad|>``, ...).

Gotchas met while building it:

- The pre-tokenizer is the Qwen2 regex with digits split one by one (``\p{N}``), so ``[120, 340]``
  tokenises the same wherever it appears and boxes are read digit by digit.
- The regex keeps ``:`` apart from a following `` <``, which is what makes the Idefics3 generation prompt
  (``...Assistant:``) an exact token prefix of the rendered training text (``...Assistant: <reasoning>``).
- Special tokens are passed to the trainer (``special_tokens=``): they get the lowest ids and become added
  tokens with ``special=True``, never split or merged, and dropped by ``decode(skip_special_tokens=True)``.
- The protocol tags are added AFTER training (tokens added before ``train_from_iterator`` collide with the
  trainer's special-token ids), and the corpus is split at the tags for training, else BPE learns merges
  such as ``>The`` that the atomic tags then break into ``T`` + ``he``.
- The corpus is generated from a fixed seed, so the same vocabulary comes out of every build.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from medeyes_env.protocol import LOC_TOKENS, loc_token, protocol_instructions

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PROTOCOL_TAGS: list[str] = [
    "<reasoning>",
    "</reasoning>",
    "<action>",
    "</action>",
    "<answer>",
    "</answer>",
    "<feedback>",
    "</feedback>",
]
"""The protocol's tags, added as single NON-special tokens: decoding keeps them, and a closing tag always
ends exactly at a token boundary, so stopping at ``</action>`` never leaves half a token behind."""

LOCATION_TOKENS: list[str] = [loc_token(i) for i in range(LOC_TOKENS)]
"""``<loc00>`` .. ``<loc63>``: one token per box coordinate in the ``loc`` box format (PaliGemma-style), added
like the tags, so a tiny model picks a coordinate as one class instead of spelling digits."""

IDEFICS3_SPECIAL_TOKENS: list[str] = [
    "<|im_start|>",  # bos, as in SmolVLM
    "<end_of_utterance>",  # eos: ends every chat turn
    "<|im_end|>",  # pad, as in SmolVLM
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]
"""Idefics3's processor looks these up by name; ``<row_i_col_j>`` are only used with image splitting."""

QWEN2_5_VL_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # bos and pad, as in Qwen2.5
    "<|im_start|>",
    "<|im_end|>",  # eos: ends every chat turn
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""The Qwen2.5-VL special tokens, in Qwen's order (ids differ: ours start at 0)."""

_ORGANS = ["lung", "lungs", "brain", "liver", "kidney", "heart", "spleen", "chest", "abdomen", "organ", "skull"]
_FINDINGS = [
    "nodule",
    "nodules",
    "lesion",
    "lesions",
    "mass",
    "tumor",
    "cyst",
    "abnormality",
    "opacity",
    "effusion",
    "calcification",
    "hemorrhage",
    "bright spot",
    "dark spot",
]
_SIDES = ["left", "right", "upper", "lower", "middle", "central", "peripheral", "top", "bottom"]
_MODALITIES = ["CT", "MRI", "X-ray", "ultrasound", "scan", "image", "slice", "phantom"]
_QUESTION_TEMPLATES = [
    "Is there a {finding} in the {side} {organ}?",
    "Is there any {finding} in this {modality}?",
    "Does the {organ} show a {finding}?",
    "Where is the {finding} located?",
    "Which organ contains the {finding}?",
    "Is the {finding} in the {side} or {side2} part of the {organ}?",
    "How many {finding} are visible?",
    "Is this {organ} normal?",
    "What abnormality is seen in the {side} {organ}?",
    "Which side is the {finding} on? A. left B. right C. both D. none",
    "What is the modality of this image?",
    "Is the {organ} abnormal?",
]
_REASONING_TEMPLATES = [
    "The {organ} is visible. I will scan the candidate regions.",
    "I scan the {side} {organ} for a {finding}.",
    "Region {k} looks suspicious, I will drill into it.",
    "The zoomed view shows a {finding} in the {side} {organ}.",
    "The zoomed view shows no {finding}; the tissue looks normal.",
    "The confidence is high enough to answer.",
    "I look closer at the {side} part of the {organ}.",
    "There is a small {finding} near the {side} edge.",
    "No abnormality found in this region, I return to scanning.",
]
_FEEDBACK_TEMPLATES = [
    "<feedback>Scanned {n} region(s), shown side by side, numbered: 1: {box}; 2: {box}.</feedback>",
    "<feedback>Scanned {n} region(s), shown outlined on the overview: 1: {box}.</feedback>",
    "<feedback>Zoomed into region {box} at full resolution.</feedback>",
    "<feedback>invalid action: {err}</feedback>",
    "<feedback>step {k} of {m}; answer now</feedback>",
]
_ERRORS = ["box outside the image", "unknown action name", "missing closing tag", "malformed JSON"]
_ANSWERS = ["yes", "no", "A", "B", "C", "D", "left", "right", "both", "none", "CT", "MRI", "X-ray"]
_SYSTEM = (
    "You are a careful radiologist. Look at the image, then think in <reasoning>...</reasoning>, "
    'look closer with <action>{"name": "scan", "boxes": [[x1, y1, x2, y2], ...]}</action> or '
    '<action>{"name": "drill", "box": [x1, y1, x2, y2]}</action>, and finish with <answer>...</answer>. '
    "Boxes are pixels of the original image."
)


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    x2, y2 = x1 + rng.randint(4, 400), y1 + rng.randint(4, 400)
    return f"[{x1}, {y1}, {x2}, {y2}]"


def _fill(template: str, rng: random.Random) -> str:
    sides = rng.sample(_SIDES, 2)
    return template.format(
        finding=rng.choice(_FINDINGS),
        organ=rng.choice(_ORGANS),
        side=sides[0],
        side2=sides[1],
        modality=rng.choice(_MODALITIES),
        k=rng.randint(1, 5),
        m=rng.randint(2, 6),
        n=rng.randint(1, 5),
        box=_box(rng),
        boxes=", ".join(_box(rng) for _ in range(rng.randint(1, 4))),
        err=rng.choice(_ERRORS),
    )


def protocol_corpus(n_texts: int = 4000, seed: int = 0) -> Iterator[str]:
    """Yield synthetic training texts: questions, protocol turns, feedback and chat-template role words.

    >>> any(text.startswith("<reasoning>") for text in protocol_corpus(10))
    True
    """
    rng = random.Random(seed)
    for i in range(n_texts):
        kind = i % 5
        if kind == 0:
            yield _fill(rng.choice(_QUESTION_TEMPLATES), rng)
        elif kind == 1:
            boxes = ", ".join(_box(rng) for _ in range(rng.randint(1, 5)))
            yield (
                f"<reasoning>{_fill(rng.choice(_REASONING_TEMPLATES), rng)}</reasoning>"
                f'<action>{{"name": "scan", "boxes": [{boxes}]}}</action>'
            )
        elif kind == 2:
            yield (
                f"<reasoning>{_fill(rng.choice(_REASONING_TEMPLATES), rng)}</reasoning>"
                f'<action>{{"name": "drill", "box": {_box(rng)}}}</action>'
            )
        elif kind == 3:
            yield (
                f"<reasoning>{_fill(rng.choice(_REASONING_TEMPLATES), rng)}</reasoning>"
                f"<answer>{rng.choice(_ANSWERS)}</answer>"
            )
        else:
            yield _fill(rng.choice(_FEEDBACK_TEMPLATES), rng)
        if i % 50 == 0:
            # Chat-template words, in both renderings (Idefics3 "User:" and Qwen "user\n").
            yield f"System: {_SYSTEM}\nUser: {_fill(rng.choice(_QUESTION_TEMPLATES), rng)}\nAssistant: <reasoning>"
            yield "system\nuser\nassistant\nYou are a helpful assistant.\n"
            yield protocol_instructions(rng.choice([256, 384, 512, 640]), rng.choice([256, 384, 512]), 4)
    yield "".join(chr(c) for c in range(32, 127))  # every printable ASCII character at least once


def train_bpe_tokenizer(special_tokens: list[str], vocab_size: int, seed: int = 0) -> Tokenizer:
    """Train a byte-level BPE :class:`tokenizers.Tokenizer` on :func:`protocol_corpus`.

    The vocabulary may come out smaller than ``vocab_size`` when the corpus runs out of pairs to merge.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Train on the text between the tags, as the tokenizer will see it once the tags are atomic tokens.
    tag_pattern = re.compile("|".join(re.escape(tag) for tag in PROTOCOL_TAGS))
    pieces = (piece for text in protocol_corpus(seed=seed) for piece in tag_pattern.split(text) if piece)
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in PROTOCOL_TAGS])
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in LOCATION_TOKENS])
    return tokenizer
