"""A real model behind verl's server-manager interface, for CPU tests of verl agent loops.

verl's ``LLMServerClient.generate(request_id, *, prompt_ids, sampling_params, image_data, ...) -> TokenOutput``
sends token ids (image pads already expanded by the Continuous Token builder) and the images to a vLLM or
SGLang server on a GPU. :class:`TransformersTokenServer` answers the same call on CPU with ``model.generate``
of a local transformers model: the image processor turns ``image_data`` into ``pixel_values`` and
``image_grid_thw``, the model reads the prompt ids as given, and the sampled tokens and their log-probabilities
come back as verl's own ``TokenOutput``.

``script``: texts the next calls must produce. The model still runs every forward pass and samples every token,
but ``prefix_allowed_tokens_fn`` allows only the script's next token (then end of turn), so a test can make a
random-weight model play a chosen episode through the real token path.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.workers.rollout.replica import TokenOutput


class TransformersTokenServer:
    """``generate`` with the signature of verl's ``LLMServerClient.generate``, on a local transformers model."""

    def __init__(self, model: Any, processor: Any, *, seed: int = 0) -> None:
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.generator_seed = seed
        # A random-weight model samples the vision tokens too; a pad the policy wrote would stand for no image.
        vision = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
        ids = [self.tokenizer.convert_tokens_to_ids(token) for token in vision]
        self.bad_words_ids = [[i] for i in ids if i is not None and i != self.tokenizer.unk_token_id]
        self.script: list[str] = []
        self.calls: list[dict[str, Any]] = []

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: list[Any] | None = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Generate one turn for ``prompt_ids`` with ``image_data`` as the images of its pads."""
        input_ids = torch.tensor([prompt_ids])
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if image_data:
            pixels = self.processor.image_processor(images=image_data, return_tensors="pt")
            inputs |= {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        merge = getattr(self.processor.image_processor, "merge_size", 2)
        grids = inputs["image_grid_thw"].tolist() if image_data else []
        pads_expected = sum(t * h * w // merge**2 for t, h, w in grids)
        assert int((input_ids == self.image_token_id).sum()) == pads_expected, "image pads do not match the images"
        temperature = float(sampling_params.get("temperature", 1.0))
        allowed = self._scripted(len(prompt_ids)) if self.script else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed + len(self.calls))
            out = self.model.generate(
                **inputs,
                max_new_tokens=int(sampling_params.get("max_tokens", 64)),
                do_sample=temperature > 0 and allowed is None,
                temperature=temperature if temperature > 0 else None,
                top_p=float(sampling_params.get("top_p", 1.0)),
                top_k=None,
                eos_token_id=self.end_id,
                pad_token_id=self.tokenizer.pad_token_id,
                prefix_allowed_tokens_fn=allowed,
                bad_words_ids=self.bad_words_ids or None,
                output_scores=True,
                return_dict_in_generate=True,
            )
        token_ids = out.sequences[0, len(prompt_ids) :].tolist()
        log_probs = [
            float(torch.log_softmax(score[0].float(), dim=-1)[token])
            for score, token in zip(out.scores, token_ids, strict=True)
        ]
        self.calls.append({"request_id": request_id, "prompt_len": len(prompt_ids), "images": len(image_data or [])})
        return TokenOutput(token_ids=token_ids, log_probs=log_probs, stop_reason="completed")

    def _scripted(self, start: int) -> Any:
        target = [*self.tokenizer.encode(self.script.pop(0), add_special_tokens=False), self.end_id]

        def allowed(batch_id: int, sequence: torch.Tensor) -> list[int]:
            done = len(sequence) - start
            return [target[done] if done < len(target) else self.end_id]

        return allowed
