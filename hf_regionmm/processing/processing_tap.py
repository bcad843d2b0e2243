"""Processor for TAP-v2: images + visual prompts (+ training targets) -> model inputs; outputs -> masks, concepts,
captions in the original image.

TAP (tapv2.txt section 3.1, Figure 1) is prompted with points, boxes and sketches. Following the library convention
(DESIGN.md principle 3) they go in as absolute pixels of the *original* image, nested per image:

- `points[image][prompt] = [[x, y], ...]` with `labels[image][prompt] = [1, 0, ...]` (1 positive, 0 negative;
  default all positive): one prompt per entry, e.g. a click and its refinements;
- `boxes[image][prompt] = [x1, y1, x2, y2]`: one box prompt each (its corners get labels 2 and 3, as released);
- `sketches[image][prompt] = [[x, y], ...]`: a scribble of at least 2 positive points.

The prompts of an image are ordered points, then boxes, then sketches; training targets (`masks`, `concept_targets`,
`captions`) are given per prompt in that order. Coordinates are mapped into the resized, padded model frame
(`x * new_w / w`, `y * new_h / h`, as `SamProcessor`) and padded with label 4 (TAP's padding label).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_templates import MESSAGE_TEXT_AND_IMAGE_COUNT, jinja_literal
from .region_inputs import validate_image_sizes, validate_pixel_boxes, validate_points

__all__ = ["TAP_CHAT_TEMPLATE", "TapChatProcessor", "TapProcessor", "TAP_PAD_LABEL", "caption_prompt", "chat_prompt"]

# TAP's padding label (the model's `TAP_POINT_LABELS["pad"]`; `processing/` may not import `modeling/`).
TAP_PAD_LABEL = 4
_BOX_CORNER_LABELS = (2, 3)


class TapProcessor(ProcessorMixin):
    r"""TAP-v2 processor: a [`TapImageProcessor`] plus the caption tokenizer.

    Args:
        image_processor: resize longest side + pad + normalize (`TapImageProcessor`).
        tokenizer: the caption tokenizer (BPE 32k in the paper; a word-level tokenizer for tiny models) with BOS, EOS
            and pad tokens.
        max_caption_length: caption tokens including BOS and EOS (the model's `text_max_length`, 40).

    Model inputs produced by `__call__` (B images, P prompts of the image with the most, N points):
        pixel_values: `(B, 3, S, S)` float32; original_sizes, reshaped_input_sizes: `(B, 2)` int64 `(height, width)`.
        input_points: `(B, P, N, 2)` float32 pixel `(x, y)` in the padded model frame; input_labels: `(B, P, N)`
            int64 (0 negative, 1 positive, 2/3 box corners, 4 padding; a padding prompt holds only label 4).
        mask_labels: `(B, P, m, m)` float32 with `masks=`; concept_targets: `(B, P, K)` with `concept_targets=`;
            caption_ids: `(B, P, L)` int64 `[BOS, words, EOS, pad...]` with `captions=` (an absent caption: all pad).
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, max_caption_length: int = 40, **kwargs):
        if image_processor is None:
            raise ValueError("`image_processor` is required: pass a TapImageProcessor.")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required: pass the caption tokenizer (BOS, EOS and pad tokens).")
        if not isinstance(max_caption_length, int) or isinstance(max_caption_length, bool) or max_caption_length < 2:
            raise ValueError(f"`max_caption_length` must be an integer >= 2; got {max_caption_length!r}.")
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, token, None) is None:
                raise ValueError(f"`tokenizer` has no {token[:-3]}; TAP captions need BOS, EOS and pad tokens.")
        self.max_caption_length = max_caption_length
        super().__init__(image_processor, tokenizer)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_points", "input_labels", "mask_labels", "concept_targets", "caption_ids"]

    # -----------------------------------------------------------------------------------------------------------
    # __call__

    def __call__(
        self,
        images: Any = None,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        sketches: Any = None,
        masks: Any = None,
        concept_targets: Any = None,
        captions: Any = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Prepare images and prompts (and optional training targets) for `TapModel`.

        Args:
            images: one image or a list (PIL / array / tensor).
            points, labels, boxes, sketches: prompts per image in original pixels (see the module docstring).
            masks: per image, `(n_i, H, W)` binary ground-truth masks, one per prompt.
            concept_targets: per image, `(n_i, K)` target distributions over the concept bank.
            captions: per image, a list of `n_i` caption strings (None for a prompt without caption).
            return_tensors: only `"pt"` is supported (the model takes tensors).
        """
        if images is None:
            raise ValueError("`images` is required: TAP tokenizes regions of an image.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt'; got {return_tensors!r}.")
        image_inputs = self.image_processor(images, return_tensors="pt", **kwargs)
        original_sizes = [tuple(int(v) for v in size) for size in image_inputs["original_sizes"].tolist()]
        reshaped_sizes = [tuple(int(v) for v in size) for size in image_inputs["reshaped_input_sizes"].tolist()]
        prompts = self._prompts_per_image(points, labels, boxes, sketches, original_sizes)
        counts = [len(image_prompts) for image_prompts in prompts]
        if sum(counts) == 0:
            raise ValueError("Give at least one prompt: `points=`, `boxes=` or `sketches=` (original-image pixels).")

        input_points, input_labels = self._pad_prompts(prompts, original_sizes, reshaped_sizes)
        data: dict[str, Any] = {
            "pixel_values": image_inputs["pixel_values"],
            "original_sizes": image_inputs["original_sizes"],
            "reshaped_input_sizes": image_inputs["reshaped_input_sizes"],
            "input_points": input_points,
            "input_labels": input_labels,
        }
        num_prompts = input_points.shape[1]
        if masks is not None:
            per_image = self._per_image(masks, "masks", len(counts))
            mask_size = (self.image_processor.mask_pad_size["height"], self.image_processor.mask_pad_size["width"])
            mask_labels = torch.zeros((len(counts), num_prompts, *mask_size), dtype=torch.float32)
            for index, (image_masks, count) in enumerate(zip(per_image, counts)):
                processed = self.image_processor.preprocess_instance_masks(
                    image_masks, original_sizes[index], name=f"masks[{index}]"
                )
                self._check_count(processed.shape[0], count, f"masks[{index}]")
                mask_labels[index, :count] = processed
            data["mask_labels"] = mask_labels
        if concept_targets is not None:
            data["concept_targets"] = self._concept_targets(concept_targets, counts, num_prompts)
        if captions is not None:
            data["caption_ids"] = self._caption_ids(captions, counts, num_prompts)
        return BatchFeature(data=data, tensor_type=None)

    @staticmethod
    def _per_image(values: Any, name: str, num_images: int) -> list[Any]:
        if isinstance(values, (torch.Tensor, np.ndarray)) and num_images == 1 and values.ndim in (2, 3):
            values = [values]
        if not isinstance(values, (list, tuple)) and not (
            isinstance(values, (torch.Tensor, np.ndarray)) and values.ndim >= 1
        ):
            raise TypeError(f"`{name}` must hold one entry per image; got {type(values).__name__}.")
        if len(values) != num_images:
            raise ValueError(
                f"`{name}` has {len(values)} entries but there are {num_images} images; give one per image."
            )
        return list(values)

    @staticmethod
    def _check_count(given: int, expected: int, name: str) -> None:
        if given != expected:
            raise ValueError(
                f"`{name}` has {given} entries but the image has {expected} prompts (points, then boxes, then "
                f"sketches); give one per prompt."
            )

    def _prompts_per_image(
        self, points: Any, labels: Any, boxes: Any, sketches: Any, sizes: list[tuple[int, int]]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Validate every prompt kind and list `(points (n, 2), labels (n,))` per prompt, per image, in order."""
        validate_image_sizes(sizes)
        prompts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sizes]
        if points is not None or labels is not None:
            point_prompts = validate_points(
                points, labels, sizes, "points", labels_name="labels", allowed_labels=(0, 1)
            )
            self._append(prompts, point_prompts)
        if boxes is not None:
            for index, image_boxes in enumerate(validate_pixel_boxes(boxes, sizes, "boxes")):
                for box in image_boxes:
                    prompts[index].append((box.reshape(2, 2), torch.tensor(_BOX_CORNER_LABELS, dtype=torch.long)))
        if sketches is not None:
            sketch_prompts = validate_points(sketches, None, sizes, "sketches", labels_name="sketch_labels")
            for image_index in range(len(sizes)):
                for object_index in range(sketch_prompts.mask.shape[1]):
                    count = int(sketch_prompts.mask[image_index, object_index].sum())
                    if 0 < count < 2:
                        raise ValueError(
                            f"`sketches[{image_index}][{object_index}]` has {count} point; a sketch needs at least 2 "
                            f"points (pass a single click through `points=`)."
                        )
            self._append(prompts, sketch_prompts)
        return prompts

    @staticmethod
    def _append(prompts: list[list[tuple[torch.Tensor, torch.Tensor]]], validated: Any) -> None:
        for image_index in range(validated.points.shape[0]):
            for object_index in range(validated.points.shape[1]):
                real = validated.mask[image_index, object_index]
                if bool(real.any()):
                    prompts[image_index].append(
                        (
                            validated.points[image_index, object_index][real],
                            validated.labels[image_index, object_index][real],
                        )
                    )

    @staticmethod
    def _pad_prompts(
        prompts: list[list[tuple[torch.Tensor, torch.Tensor]]],
        original_sizes: list[tuple[int, int]],
        reshaped_sizes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_prompts = max(len(image_prompts) for image_prompts in prompts)
        num_points = max(points.shape[0] for image_prompts in prompts for points, _ in image_prompts)
        input_points = torch.zeros((len(prompts), num_prompts, num_points, 2), dtype=torch.float32)
        input_labels = torch.full((len(prompts), num_prompts, num_points), TAP_PAD_LABEL, dtype=torch.long)
        for image_index, image_prompts in enumerate(prompts):
            (height, width), (new_height, new_width) = original_sizes[image_index], reshaped_sizes[image_index]
            scale = torch.tensor([new_width / width, new_height / height], dtype=torch.float32)
            for prompt_index, (points, labels) in enumerate(image_prompts):
                input_points[image_index, prompt_index, : points.shape[0]] = points * scale
                input_labels[image_index, prompt_index, : labels.shape[0]] = labels
        return input_points, input_labels

    def _concept_targets(self, concept_targets: Any, counts: list[int], num_prompts: int) -> torch.Tensor:
        per_image = self._per_image(concept_targets, "concept_targets", len(counts))
        rows = []
        for index, (targets, count) in enumerate(zip(per_image, counts)):
            tensor = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(len(targets), -1)
            self._check_count(tensor.shape[0], count, f"concept_targets[{index}]")
            rows.append(tensor)
        widths = {row.shape[1] for row in rows if row.shape[0]}
        if len(widths) > 1:
            raise ValueError(
                f"`concept_targets` rows must all have the same number of concepts; got {sorted(widths)}."
            )
        width = widths.pop() if widths else 1
        output = torch.zeros((len(counts), num_prompts, width), dtype=torch.float32)
        for index, row in enumerate(rows):
            if row.shape[0]:
                if not bool(torch.isfinite(row).all()) or bool((row < 0).any()):
                    raise ValueError(f"`concept_targets[{index}]` must hold finite, non-negative probabilities.")
                if not torch.allclose(row.sum(-1), torch.ones(row.shape[0]), atol=1e-3):
                    raise ValueError(f"`concept_targets[{index}]` rows must sum to 1 (distributions over concepts).")
                output[index, : row.shape[0]] = row
        return output

    def _caption_ids(self, captions: Any, counts: list[int], num_prompts: int) -> torch.Tensor:
        per_image = self._per_image(captions, "captions", len(counts))
        tokenizer = self.tokenizer
        ids = torch.full((len(counts), num_prompts, self.max_caption_length), tokenizer.pad_token_id, dtype=torch.long)
        longest = 2
        for image_index, (image_captions, count) in enumerate(zip(per_image, counts)):
            if isinstance(image_captions, str):
                raise TypeError(
                    f"`captions[{image_index}]` must be a list of captions (one per prompt), not a string."
                )
            self._check_count(len(image_captions), count, f"captions[{image_index}]")
            for prompt_index, caption in enumerate(image_captions):
                if caption is None:
                    continue
                if not isinstance(caption, str):
                    raise TypeError(f"`captions[{image_index}][{prompt_index}]` must be a string or None.")
                words = tokenizer(caption, add_special_tokens=False)["input_ids"]
                tokens = [tokenizer.bos_token_id, *words[: self.max_caption_length - 2], tokenizer.eos_token_id]
                ids[image_index, prompt_index, : len(tokens)] = torch.tensor(tokens)
                longest = max(longest, len(tokens))
        return ids[..., :longest]

    # -----------------------------------------------------------------------------------------------------------
    # post-processing

    def post_process_masks(
        self,
        pred_masks: torch.Tensor,
        original_sizes: Any,
        reshaped_input_sizes: Any,
        mask_threshold: float = 0.0,
        binarize: bool = True,
    ) -> list[torch.Tensor]:
        """Masks in the original images: `pred_masks` `(B, P, M, m, m)` logits -> per image `(P, M, H, W)` (bool
        when `binarize`): bilinear to the padded frame, crop the valid region, bilinear to the original size."""
        if not isinstance(pred_masks, torch.Tensor) or pred_masks.ndim != 5:
            raise ValueError("`pred_masks` must be the model's (batch, prompts, masks, m, m) mask logits.")
        sizes = original_sizes.tolist() if isinstance(original_sizes, torch.Tensor) else original_sizes
        validate_image_sizes([tuple(int(v) for v in size) for size in sizes], "original_sizes")
        return self.image_processor.post_process_masks(
            list(pred_masks.float()),
            original_sizes,
            reshaped_input_sizes,
            mask_threshold=mask_threshold,
            binarize=binarize,
        )

    def post_process_captions(self, caption_ids: torch.Tensor) -> list[list[str]] | list[str]:
        """Decode `TapModel.generate_captions` output `(B, P, T)` (or `(N, T)`) into strings, cut at EOS."""
        if not isinstance(caption_ids, torch.Tensor) or caption_ids.ndim not in (2, 3):
            raise ValueError("`caption_ids` must be a (batch, prompts, length) or (n, length) tensor of token ids.")
        rows = caption_ids.reshape(-1, caption_ids.shape[-1]).tolist()
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in rows:
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        if caption_ids.ndim == 2:
            return texts
        per_image = caption_ids.shape[1]
        return [texts[i : i + per_image] for i in range(0, len(texts), per_image)]

    @staticmethod
    def post_process_concepts(
        concept_logits: torch.Tensor, concept_names: list[str] | tuple[str, ...], top_k: int = 1
    ) -> list[list[list[dict[str, Any]]]]:
        """Top-k concepts per prompt: `concept_logits` `(B, P, K)` -> `[image][prompt] = [{"concept", "score"}]`
        with softmax probabilities, best first (`concept_names`: the model's `concept_names`)."""
        if not isinstance(concept_logits, torch.Tensor) or concept_logits.ndim != 3:
            raise ValueError("`concept_logits` must be the model's (batch, prompts, num_concepts) tensor.")
        if concept_names is None or len(concept_names) != concept_logits.shape[-1]:
            count = None if concept_names is None else len(concept_names)
            raise ValueError(
                f"`concept_names` must name every concept ({concept_logits.shape[-1]}); got {count}. Use "
                f"`model.concept_names` (set with `model.set_concept_bank(embeddings, names)`)."
            )
        if not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= concept_logits.shape[-1]:
            raise ValueError(f"`top_k` must be in [1, {concept_logits.shape[-1]}]; got {top_k!r}.")
        scores, indices = concept_logits.float().softmax(-1).topk(int(top_k), dim=-1)
        return [
            [
                [{"concept": concept_names[i], "score": float(s)} for s, i in zip(prompt_scores, prompt_indices)]
                for prompt_scores, prompt_indices in zip(image_scores.tolist(), image_indices.tolist())
            ]
            for image_scores, image_indices in zip(scores, indices)
        ]


# ---------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat (section 3.2 / 3.3 "Instruction following")

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100


def chat_prompt(question: str, history: Any = ()) -> str:
    """The USER / ASSISTANT conversation of section 3.3, image first: `"USER: <image>\\n{q1} ASSISTANT: {a1}
    USER: {q2} ASSISTANT:"` for `history = [(q1, a1)]` and `question = q2`.

    Equals `TapChatProcessor.apply_chat_template(messages, add_generation_prompt=True)` for the same conversation
    with a `{"type": "image"}` entry in the first user message (`TAP_CHAT_TEMPLATE`)."""
    turns = list(history) + [(question, None)]
    parts = []
    for index, (user, assistant) in enumerate(turns):
        if not isinstance(user, str) or not user.strip():
            raise ValueError(f"Turn {index} of the conversation needs a non-empty user message; got {user!r}.")
        prefix = f"{IMAGE_TOKEN}\n" if index == 0 else ""
        parts.append(f"USER: {prefix}{user} ASSISTANT:" + ("" if assistant is None else f" {assistant}"))
    return " ".join(parts)


def caption_prompt() -> str:
    """The pre-training prompt of section 3.2: the visual tokens alone; the answer is the detailed caption."""
    return IMAGE_TOKEN


def _jinja_error(message: str) -> str:
    return "{{ raise_exception(" + jinja_literal(f"TAP-Chat: {message}") + ") }}"


# `chat_prompt` / `caption_prompt` as a chat template. A user turn already ends with the `ASSISTANT:` cue (as in
# `chat_prompt`), so `add_generation_prompt` adds nothing. A first user message holding only the image is the
# caption pre-training prompt (`<image>` alone). Earlier answers carry no EOS (as in `chat_prompt`'s history); the
# final answer of a conversation ends with EOS, as the processor's `answers=` labels do, so a rendered training
# conversation tokenizes exactly as `processor(text=chat_prompt(q, history), answers=a)`. `{% generation %}` marks
# the answers for `return_assistant_tokens_mask` (trl's `assistant_only_loss`).
TAP_CHAT_TEMPLATE = (
    "{%- set ns = namespace(started=false, caption=false, expect='user') -%}"
    "{%- for message in messages -%}" + MESSAGE_TEXT_AND_IMAGE_COUNT + "{%- if message['role'] == 'user' -%}"
    "{%- if ns.expect != 'user' -%}"
    + _jinja_error("messages must alternate user / assistant, starting with the user.")
    + "{%- endif -%}"
    "{%- if not ns.started -%}"
    "{%- if n_images != 1 -%}"
    + _jinja_error('the first user message must hold exactly one {"type": "image"} entry.')
    + "{%- endif -%}"
    "{%- if text | trim == '' -%}"
    "{{- " + jinja_literal(IMAGE_TOKEN) + " -}}{%- set ns.caption = true -%}"
    "{%- else -%}"
    "{{- " + jinja_literal(f"USER: {IMAGE_TOKEN}\n") + " + text + ' ASSISTANT:' -}}"
    "{%- endif -%}"
    "{%- set ns.started = true -%}"
    "{%- else -%}"
    "{%- if n_images > 0 -%}"
    + _jinja_error("one image per conversation, in the first user message.")
    + "{%- endif -%}"
    "{%- if ns.caption -%}"
    + _jinja_error("a caption conversation (a first user message with the image and no text) has one turn.")
    + "{%- endif -%}"
    "{%- if text | trim == '' -%}" + _jinja_error("every user message after the first needs text.") + "{%- endif -%}"
    "{{- ' USER: ' + text + ' ASSISTANT:' -}}"
    "{%- endif -%}"
    "{%- set ns.expect = 'assistant' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.expect != 'assistant' -%}"
    + _jinja_error("messages must alternate user / assistant, starting with the user.")
    + "{%- endif -%}"
    "{{- ' ' -}}{% generation %}{{- text -}}{%- if loop.last -%}{{- eos_token -}}{%- endif -%}{% endgeneration %}"
    "{%- set ns.expect = 'user' -%}"
    "{%- else -%}"
    + _jinja_error("unknown role; use user and assistant (the conversation format has no system prompt).")
    + "{%- endif -%}"
    "{%- endfor -%}"
)

# Tokenizer options `__call__` accepts (trl's collators and `apply_chat_template` pass them); the rest go to the image
# processor.
_TEXT_KWARGS = ("padding", "truncation", "max_length", "pad_to_multiple_of", "add_special_tokens")
# `text_replacement_offsets` come with `return_offsets_mapping`, which `apply_chat_template` sets along with this flag.
_IGNORED_TEXT_KWARGS = (
    "return_attention_mask",
    "return_token_type_ids",
    "return_mm_token_type_ids",
    "return_text_replacement_offsets",
)


class TapChatProcessor(ProcessorMixin):
    r"""TAP-v2-Chat processor: a [`TapImageProcessor`] plus the LLM tokenizer with `<image>` added.

    Args:
        image_processor: `TapImageProcessor` (longest side to the model's `image_size`, padded).
        tokenizer: the LLM tokenizer (Phi-2 in the paper); must know `<image>` as one token.
        num_image_tokens: `<image>` slots per image, the model's `num_image_tokens` (`(grid / 2) ** 2`).
        chat_template: Jinja template for `apply_chat_template`; defaults to `TAP_CHAT_TEMPLATE` (`chat_prompt`'s
            format). Saved as `chat_template.jinja`.

    `__call__(images, text, answers=None)`: one image and one prompt per sample, the prompt holding `<image>` once
    (`chat_prompt(question)`, `caption_prompt()` or a conversation rendered by `apply_chat_template`); returns
    `pixel_values` `(B, 3, S, S)`, `original_sizes` / `reshaped_input_sizes` `(B, 2)`, `input_ids` and
    `attention_mask` `(B, L)` int64 and, with `answers`, `labels` `(B, L)` (-100 on the prompt and padding; the answer
    and its EOS are supervised).

    Chat: `processor.apply_chat_template(messages, add_generation_prompt=True) == chat_prompt(question, history)`,
    and `apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)` marks every
    assistant answer, which is how `trl.SFTTrainer(..., args=SFTConfig(assistant_only_loss=True))` masks the loss to
    the answers on a data set of `messages` + `images`.
    """

    chat_prompt = staticmethod(chat_prompt)
    caption_prompt = staticmethod(caption_prompt)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 1024,
        chat_template: str | None = None,
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("`image_processor` (TapImageProcessor) and `tokenizer` (with `<image>`) are required.")
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"`num_image_tokens` must be an integer >= 1; got {num_image_tokens!r}.")
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError("`tokenizer` must contain `<image>` as a special token; add it with add_special_tokens.")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("`tokenizer` needs pad and eos tokens.")
        self.num_image_tokens = num_image_tokens
        self.image_token = IMAGE_TOKEN
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or TAP_CHAT_TEMPLATE)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "labels"]

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        answers: Any = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        videos: Any = None,
        audio: Any = None,
        return_offsets_mapping: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """Prepare images and prompts (and optional answers) for `TapChatForConditionalGeneration`.

        Args:
            images: one image per prompt (PIL / array / tensor), as a list or a list of one-image lists (the layout
                `apply_chat_template` and trl's collators pass).
            text: a prompt or a list of prompts, each holding `<image>` exactly once.
            answers: one answer per prompt for training, appended after the prompt with EOS and supervised in
                `labels`.
            padding_side: `"right"` (training) or `"left"` (batched generation); default: the tokenizer's.
            return_tensors: `"pt"` or None (None keeps unequal-length rows as lists when `padding=False`).
            return_offsets_mapping: also return `offset_mapping` `(B, L, 2)` (character spans in the text with
                `<image>` expanded) and `text_replacement_offsets` (where `<image>` was expanded), which
                `apply_chat_template(..., return_assistant_tokens_mask=True)` uses to align the answer masks.
            **kwargs: tokenizer options `padding` (True / "longest", "max_length", False), `truncation`,
                `max_length`, `pad_to_multiple_of`, `add_special_tokens` (default True: the tokenizer's BOS); any
                other keyword goes to the image processor.
        """
        if videos is not None or audio is not None:
            raise ValueError("TAP-Chat takes images and text only; got `videos` or `audio`.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt' or None; got {return_tensors!r}.")
        text_options = {name: kwargs.pop(name) for name in _TEXT_KWARGS if name in kwargs}
        for name in _IGNORED_TEXT_KWARGS:
            kwargs.pop(name, None)
        if kwargs.pop("sanitize_control_tokens", False):
            raise ValueError("`sanitize_control_tokens` is not supported by TapChatProcessor; pass plain messages.")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a prompt string or a list of them (one per image).")
        if images is None:
            raise ValueError("`images` is required: every TAP-Chat prompt talks about one image.")
        image_inputs = self.image_processor(self._one_image_per_sample(images), return_tensors="pt", **kwargs)
        if image_inputs["pixel_values"].shape[0] != len(texts):
            raise ValueError(
                f"Got {image_inputs['pixel_values'].shape[0]} images for {len(texts)} prompts; give one image per prompt."
            )
        for index, prompt in enumerate(texts):
            if prompt.count(IMAGE_TOKEN) != 1:
                raise ValueError(
                    f"`text[{index}]` must contain `{IMAGE_TOKEN}` exactly once (where the image goes); found "
                    f"{prompt.count(IMAGE_TOKEN)}. Use `TapChatProcessor.chat_prompt(question)`."
                )
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(texts) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"`answers` must hold one string per prompt ({len(texts)}).")
        side = padding_side or self.tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right'; got {side!r}.")

        rows, replacements = [], []
        for index, prompt in enumerate(texts):
            row, replacement = self._tokenize_sample(
                index,
                prompt,
                None if answers is None else answers[index],
                add_special_tokens=text_options.get("add_special_tokens", True),
                with_offsets=return_offsets_mapping,
            )
            rows.append(self._truncate(row, index, text_options))
            replacements.append([replacement])
        data: dict[str, Any] = {**dict(image_inputs), **self._pad(rows, side, text_options, return_tensors)}
        if answers is None:
            data.pop("labels")
        if return_offsets_mapping:
            data["text_replacement_offsets"] = replacements
        else:
            data.pop("offset_mapping")
        return BatchFeature(data=data, tensor_type=None)

    @staticmethod
    def _one_image_per_sample(images: Any) -> Any:
        if not isinstance(images, (list, tuple)):
            return images
        flat = []
        for index, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                if len(item) != 1:
                    raise ValueError(
                        f"`images[{index}]` holds {len(item)} images; TAP-Chat takes exactly one image per prompt."
                    )
                item = item[0]
            flat.append(item)
        return flat

    def _tokenize_sample(
        self, index: int, prompt: str, answer: str | None, add_special_tokens: bool, with_offsets: bool
    ) -> tuple[dict[str, list], dict[str, Any]]:
        """Expand `<image>` to `num_image_tokens` slots, tokenize, append the answer + EOS (supervised)."""
        tokenizer = self.tokenizer
        start = prompt.index(IMAGE_TOKEN)
        slots = IMAGE_TOKEN * self.num_image_tokens
        expanded = prompt[:start] + slots + prompt[start + len(IMAGE_TOKEN) :]
        replacement = {
            "type": "image",
            "span": (start, start + len(IMAGE_TOKEN)),
            "new_span": (start, start + len(slots)),
            "text": IMAGE_TOKEN,
            "replacement": slots,
        }
        encoding = tokenizer(expanded, add_special_tokens=add_special_tokens, return_offsets_mapping=with_offsets)
        ids = list(encoding["input_ids"])
        offsets = [tuple(pair) for pair in encoding["offset_mapping"]] if with_offsets else [(0, 0)] * len(ids)
        labels = [IGNORE_INDEX] * len(ids)
        if ids.count(self.image_token_id) != self.num_image_tokens:
            raise ValueError(
                f"`text[{index}]` tokenized to {ids.count(self.image_token_id)} `<image>` ids instead of "
                f"{self.num_image_tokens}; the tokenizer must keep `<image>` as one special token."
            )
        if answer is not None:
            answer_encoding = tokenizer(" " + answer, add_special_tokens=False, return_offsets_mapping=with_offsets)
            answer_ids = [*answer_encoding["input_ids"], tokenizer.eos_token_id]
            shift = len(expanded)
            answer_offsets = (
                [(begin + shift, end + shift) for begin, end in answer_encoding["offset_mapping"]]
                if with_offsets
                else [(0, 0)] * (len(answer_ids) - 1)
            )
            ids += answer_ids
            labels += answer_ids
            offsets += [*answer_offsets, (0, 0)]
        return {"input_ids": ids, "labels": labels, "offset_mapping": offsets}, replacement

    def _truncate(self, row: dict[str, list], index: int, options: dict[str, Any]) -> dict[str, list]:
        """Keep the first `max_length` tokens when `truncation` is on; never cut into the image slots."""
        max_length = options.get("max_length")
        if not options.get("truncation") or max_length is None or len(row["input_ids"]) <= max_length:
            return row
        kept = row["input_ids"][:max_length]
        if kept.count(self.image_token_id) != self.num_image_tokens:
            raise ValueError(
                f"`max_length`={max_length} cuts into the {self.num_image_tokens} image slots of `text[{index}]`; "
                "raise `max_length` or pass truncation=False."
            )
        return {key: values[:max_length] for key, values in row.items()}

    def _pad(
        self, rows: list[dict[str, list]], side: str, options: dict[str, Any], return_tensors: str | None
    ) -> dict[str, Any]:
        padding = options.get("padding", True)
        lengths = [len(row["input_ids"]) for row in rows]
        if padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                if return_tensors == "pt":
                    raise ValueError("The prompts tokenize to different lengths; pass padding=True to return tensors.")
                return {
                    "input_ids": [row["input_ids"] for row in rows],
                    "attention_mask": [[1] * length for length in lengths],
                    "labels": [row["labels"] for row in rows],
                    "offset_mapping": [row["offset_mapping"] for row in rows],
                }
            length = lengths[0]
        elif padding in (True, "longest"):
            length = max(lengths)
        elif padding == "max_length":
            length = options.get("max_length")
            if length is None or length < max(lengths):
                raise ValueError(
                    f"padding='max_length' needs `max_length` >= the longest prompt ({max(lengths)}); got {length!r}."
                )
        else:
            raise ValueError(f"`padding` must be True, 'longest', 'max_length' or False; got {padding!r}.")
        multiple = options.get("pad_to_multiple_of")
        if multiple:
            length = -(-length // multiple) * multiple
        batch = len(rows)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        offset_mapping = torch.zeros((batch, length, 2), dtype=torch.long)
        for index, row in enumerate(rows):
            size = len(row["input_ids"])
            span = slice(length - size, length) if side == "left" else slice(0, size)
            input_ids[index, span] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[index, span] = 1
            labels[index, span] = torch.tensor(row["labels"], dtype=torch.long)
            offset_mapping[index, span] = torch.tensor(row["offset_mapping"], dtype=torch.long).reshape(size, 2)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "offset_mapping": offset_mapping,
        }

    def post_process_image_text_to_text(
        self, generated_ids: torch.Tensor, skip_special_tokens: bool = True, **kwargs
    ) -> list[str]:
        """Decode generated ids `(B, L)` (pass only the new tokens) into answers, cut at EOS."""
        if not isinstance(generated_ids, torch.Tensor) or generated_ids.ndim != 2:
            raise ValueError("`generated_ids` must be a (batch, length) tensor of token ids.")
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in generated_ids.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens, **kwargs).strip())
        return answers
