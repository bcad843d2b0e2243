"""Processor for Groma: images, user boxes and chat text -> model inputs; generated ids -> grounded phrases and boxes.

Groma (groma.txt, Sec. 3.2 "Input and Output Formatting") talks about image regions through proxy tokens: every
region the model sees gets a slot `<rK><region>` in the first user turn, the user refers to a box with
`<roi><rK></roi><refer_feat>` and the model grounds a phrase with `<p>phrase</p><roi><rK></roi>`. Region
proposals are computed inside the model, so the processor always writes `max_region_num` slots; the model fills the
ones it uses and masks the rest (the processor/model interface is fixed by the lead, see the class docstring).

What this file reproduces from the released code (FoundationVision/Groma, reference/original_repos.md Sec. 1c):
  * the new tokens and their order (`groma/constants.py`), `groma_special_tokens`;
  * the `llava` conversation ("two" separator style, " " and "</s>") with the fixed first turn
    "Here is an image with region crops from it. Image: <image>. Regions: <region>." and the canned answer, as both a
    jinja chat template and `build_prompt`;
  * the task instruction lists of `groma/data/datasets/*.py` (Appendix A / Table 9 of the paper) and their answer
    formats (`<roi><ground_box></roi>`, `[grounding]` prefix, `<p>...</p>` around expressions);
  * label masking with `<sep>` markers around supervised answers, removed after tokenization.

Documented deviations: the released code fills `<refer_box>` inside the model; here the processor resolves it to
`<r{i}>` for user box i (user boxes occupy the first slots), and boxes are normalized xyxy instead of cxcywh.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .chat_templates import MESSAGE_TEXT_AND_IMAGE_COUNT, jinja_literal
from .region_inputs import validate_image_sizes, validate_pixel_boxes

__all__ = [
    "GROMA_BASE_NEW_TOKENS",
    "GROMA_CHAT_TEMPLATE",
    "GROMA_SYSTEM_PROMPT",
    "GromaProcessor",
    "add_groma_special_tokens",
    "build_prompt",
    "grounded_caption_answer",
    "grounded_caption_prompt",
    "grounded_chat_prompt",
    "groma_special_tokens",
    "multi_grounding_answer",
    "multi_grounding_prompt",
    "rec_answer",
    "rec_prompt",
    "region_caption_answer",
    "region_caption_prompt",
]

# ---------------------------------------------------------------------------------------------------------------
# Vocabulary (released `groma/constants.py`; kept identical to `configuration_groma.py`, a test checks they agree)
# ---------------------------------------------------------------------------------------------------------------

GROMA_BASE_NEW_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "<sep>",
    "<img>",
    "</img>",
    "<roi>",
    "</roi>",
    "<p>",
    "</p>",
    "<image>",
    "<region>",
    "<refer_box>",
    "<ground_box>",
    "<refer_feat>",
    "[grounding]",
)

PAD_TOKEN, SEP_TOKEN, IMAGE_START, IMAGE_END, ROI_START, ROI_END, PHRASE_START, PHRASE_END = GROMA_BASE_NEW_TOKENS[:8]
IMAGE_TOKEN, REGION_TOKEN, REFER_BOX_TOKEN, GROUND_BOX_TOKEN, REFER_FEAT_TOKEN, GROUNDING_TOKEN = (
    GROMA_BASE_NEW_TOKENS[8:]
)
EOS_TOKEN = "</s>"
IGNORE_INDEX = -100


def groma_special_tokens(max_region_num: int) -> list[str]:
    """Groma's new tokens in id order: the 14 base tokens, then `<r0>` ... `<r{max_region_num - 1}>` (114 for 100)."""
    if not isinstance(max_region_num, int) or isinstance(max_region_num, bool) or max_region_num < 1:
        raise ValueError(f"`max_region_num` must be an integer >= 1; got {max_region_num!r}.")
    return [*GROMA_BASE_NEW_TOKENS, *(f"<r{index}>" for index in range(max_region_num))]


def add_groma_special_tokens(tokenizer: Any, max_region_num: int = 100) -> Any:
    """Append Groma's new tokens to an LLM tokenizer (e.g. Vicuna's), in the released order, as special tokens.

    After this, token j of `groma_special_tokens(max_region_num)` has id `len(original tokenizer) + j`, which is what
    the model assumes. A tokenizer that already has all of them is returned unchanged; one that has only some raises,
    because their ids would not follow the released order. Sets the pad token to `[PAD]` if the tokenizer has none.
    """
    tokens = groma_special_tokens(max_region_num)
    vocab = tokenizer.get_vocab()
    present = [token for token in tokens if token in vocab]
    if present and len(present) != len(tokens):
        raise ValueError(
            f"`tokenizer` already has {len(present)} of Groma's {len(tokens)} new tokens (e.g. {present[:3]}); start "
            "from the plain LLM tokenizer so that the new tokens get consecutive ids in the released order."
        )
    if not present:
        tokenizer.add_tokens(tokens, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Conversation format (released `conv_templates["llava"]`, first turn of `run_groma.py` and every data set)
# ---------------------------------------------------------------------------------------------------------------

GROMA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
FIRST_USER_TURN = f"Here is an image with region crops from it. Image: {IMAGE_TOKEN}. Regions: {REGION_TOKEN}."
FIRST_ASSISTANT_TURN = "Thank you for the image! How can I assist you with it?"
GENERATION_PROMPT = "ASSISTANT:"


def _check_turn(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string; got {type(value).__name__}.")
    for token in (IMAGE_TOKEN, REGION_TOKEN, IMAGE_START, IMAGE_END):
        if token in value:
            raise ValueError(
                f"`{name}` contains {token!r}, which only the fixed first turn may hold; pass the bare user query "
                "(the processor writes the image and region slots)."
            )
    return value


def build_prompt(query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
    """The released inference prompt around a user query, ending with the generation prompt `ASSISTANT:`.

    `SYSTEM USER: Here is an image with region crops from it. Image: <image>. Regions: <region>. ASSISTANT: Thank you
    for the image! How can I assist you with it?</s>USER: {q1} ASSISTANT: {a1}</s>USER: {query} ASSISTANT:`

    Args:
        query: the user's last message, e.g. `rec_prompt("the dog")`.
        history: earlier `(user, assistant)` turns after the fixed first turn.
        system: system prompt; defaults to the released one (`GROMA_SYSTEM_PROMPT`).

    Equals `processor.apply_chat_template(messages, add_generation_prompt=True)` for the same conversation with an
    image entry in the first user message.
    """
    query = _check_turn(query, "query")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"`system` must be a string or None; got {type(system).__name__}.")
    parts = [GROMA_SYSTEM_PROMPT if system is None else system, " USER: ", FIRST_USER_TURN, " ASSISTANT: "]
    parts += [FIRST_ASSISTANT_TURN, EOS_TOKEN]
    if isinstance(history, str):
        raise TypeError("`history` must be a sequence of (user, assistant) pairs, not a string.")
    for turn_index, turn in enumerate(history):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"`history[{turn_index}]` must be a (user, assistant) pair; got {turn!r}.")
        user = _check_turn(turn[0], f"history[{turn_index}][0]")
        assistant = _check_turn(turn[1], f"history[{turn_index}][1]")
        parts += ["USER: ", user, " ASSISTANT: ", assistant, EOS_TOKEN]
    parts += ["USER: ", query, " ", GENERATION_PROMPT]
    return "".join(parts)


# The same string as `build_prompt`, for `apply_chat_template`; `{% generation %}` marks assistant text for
# `return_assistant_tokens_mask` (trl's assistant-only loss).
GROMA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=" + jinja_literal(GROMA_SYSTEM_PROMPT) + ", started=false, expect='user') -%}"
    "{%- for message in messages -%}" + MESSAGE_TEXT_AND_IMAGE_COUNT + "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{ raise_exception('Groma: a system message may only come first.') }}{%- endif -%}"
    "{%- set ns.system = text -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.expect != 'user' -%}"
    "{{ raise_exception('Groma: messages must alternate user / assistant, starting with the user.') }}"
    "{%- endif -%}"
    "{%- if not ns.started -%}"
    "{%- if n_images != 1 -%}"
    '{{ raise_exception(\'Groma: the first user message must hold exactly one {"type": "image"} entry.\') }}'
    "{%- endif -%}"
    "{%- if not text -%}{{ raise_exception('Groma: the first user message needs a text query.') }}{%- endif -%}"
    "{{- ns.system + "
    + jinja_literal(f" USER: {FIRST_USER_TURN} ASSISTANT: {FIRST_ASSISTANT_TURN}{EOS_TOKEN}")
    + " -}}"
    "{%- set ns.started = true -%}"
    "{%- elif n_images > 0 -%}"
    "{{ raise_exception('Groma takes one image per conversation, in the first user message.') }}"
    "{%- endif -%}"
    "{{- 'USER: ' + text + ' ' -}}"
    "{%- set ns.expect = 'assistant' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.expect != 'assistant' -%}"
    "{{ raise_exception('Groma: messages must alternate user / assistant, starting with the user.') }}"
    "{%- endif -%}"
    "{{- 'ASSISTANT: ' -}}{% generation %}{{- text + " + jinja_literal(EOS_TOKEN) + " -}}{% endgeneration %}"
    "{%- set ns.expect = 'user' -%}"
    "{%- else -%}"
    "{{ raise_exception('Groma: unknown role ' + message['role'] + '; use system, user or assistant.') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + jinja_literal(GENERATION_PROMPT) + " -}}{%- endif -%}"
)

# ---------------------------------------------------------------------------------------------------------------
# Task templates (paper Appendix A / Table 9; the full lists are the released `groma/data/datasets/*.py`)
# ---------------------------------------------------------------------------------------------------------------

REC_INSTRUCTIONS: tuple[str, ...] = (  # refcoco_rec.py
    "Locate {} in the image.",
    "Can you spot {} in the photograph?",
    "Identify where {} is located in the picture.",
    "Please detect {} in the picture.",
    "Which region matches the description {}?",
    "Please identify the object that corresponds to {}.",
)
MULTI_GROUNDING_INSTRUCTIONS: tuple[str, ...] = (  # coco.py (also LVIS-Ground)
    "Locate all {} in this image.",
    "Identify all instances of {} in the photo.",
    "Find all instances of {} in the image.",
    "Point out all the {} visible in this picture.",
    "Detect and list each {} that appears in this photo.",
    "What is the position of each {} in the image?",
)
REGION_CAPTION_INSTRUCTIONS: tuple[str, ...] = (  # visual_genome.py (short captions)
    "What is {}?",
    "Please briefly describe {}.",
    "Provide a short description for {}.",
    "Please give a concise description of region {}.",
)
DETAILED_REGION_CAPTION_INSTRUCTIONS: tuple[str, ...] = (  # refcoco_cap.py (RefCOCOg detailed captions)
    "Can you provide me with a detailed description of {}?",
    "Please describe {} in details.",
    "I'm curious about {} in the photo. Can you describe it in detail?",
    "Please give a comprehensive description of the object {}.",
    "What does the object {} in the picture look like? Could you give me a detailed description?",
)
GROUNDED_CAPTION_INSTRUCTIONS: tuple[str, ...] = (  # flickr.py
    "Give me a concise description of the image.",
    "Please briefly summarize the content of this image.",
    "What does this picture show? Please summarize briefly.",
    "Can you give me a quick overview of what's depicted in this image?",
    "Could you describe the key elements in this photograph?",
    "Offer a brief explanation of what this image represents.",
    "Sum up the contents of this picture in one or two sentences.",
)
REFERRED_REGION = f"{ROI_START}{REFER_BOX_TOKEN}{ROI_END}{REFER_FEAT_TOKEN}"


def _choose(templates: Sequence[str], seed: int | None) -> str:
    """The first template by default (deterministic evaluation), a seeded random one as in training otherwise."""
    if seed is None:
        return templates[0]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int or None; got {type(seed).__name__}.")
    return random.Random(seed).choice(templates)


def _check_phrase(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"`{name}` must be a non-empty string; got {value!r}.")
    return value.strip()


def rec_prompt(expression: str, seed: int | None = None) -> str:
    """Referring expression comprehension: `"Locate <p>{expression}</p> in the image."` (or a seeded variant)."""
    expression = _check_phrase(expression, "expression")
    return _choose(REC_INSTRUCTIONS, seed).format(f"{PHRASE_START}{expression}{PHRASE_END}")


def multi_grounding_prompt(category: str, seed: int | None = None) -> str:
    """Ground every instance of a category: `"Locate all <p>{category}</p> in this image."` (or a seeded variant)."""
    category = _check_phrase(category, "category")
    return _choose(MULTI_GROUNDING_INSTRUCTIONS, seed).format(f"{PHRASE_START}{category}{PHRASE_END}")


def region_caption_prompt(detailed: bool = False, seed: int | None = None) -> str:
    """Describe the user's box: `"What is <roi><refer_box></roi><refer_feat>?"` (short, VG) or a detailed variant.

    Pass the box to the processor as `boxes=[[[x1, y1, x2, y2]]]`; `<refer_box>` becomes `<r0>`.
    """
    templates = DETAILED_REGION_CAPTION_INSTRUCTIONS if detailed else REGION_CAPTION_INSTRUCTIONS
    return _choose(templates, seed).format(REFERRED_REGION)


def grounded_caption_prompt(seed: int | None = None) -> str:
    """Grounded captioning: `"[grounding]Give me a concise description of the image."` (or a seeded variant).

    No space after `[grounding]`: the released data sets concatenate them, and the released weights were trained so.
    """
    return GROUNDING_TOKEN + _choose(GROUNDED_CAPTION_INSTRUCTIONS, seed)


def grounded_chat_prompt(query: str) -> str:
    """Grounded chat: `"[grounding]{query}"`, as the released Groma-Instruct data prefixes every user turn."""
    return GROUNDING_TOKEN + _check_phrase(query, "query")


def rec_answer() -> str:
    """Training target of REC: `"<roi><ground_box></roi>"`; pass the GT box as `ground_boxes=[[[x1, y1, x2, y2]]]`."""
    return f"{ROI_START}{GROUND_BOX_TOKEN}{ROI_END}"


def multi_grounding_answer(num_boxes: int) -> str:
    """Training target of multi-object grounding: `"<roi>" + "<ground_box>" * num_boxes + "</roi>"`."""
    if not isinstance(num_boxes, int) or isinstance(num_boxes, bool) or num_boxes < 1:
        raise ValueError(f"`num_boxes` must be an integer >= 1; got {num_boxes!r}.")
    return ROI_START + GROUND_BOX_TOKEN * num_boxes + ROI_END


def region_caption_answer(caption: str) -> str:
    """Training target of region captioning, normalized as the released VG loader does (lower-case, capitalized)."""
    return _check_phrase(caption, "caption").lower().capitalize()


def grounded_caption_answer(caption: str, phrases: Sequence[tuple[int, int, int]]) -> str:
    """Training target of grounded captioning: wrap phrase spans as `<p>phrase</p><roi><ground_box>...</roi>`.

    Args:
        caption: the plain caption.
        phrases: `(start, end, num_boxes)` character spans of grounded phrases in `caption`, non-overlapping; each
            gets `num_boxes` `<ground_box>` placeholders, filled from `ground_boxes` in order of appearance.
    """
    caption = _check_phrase(caption, "caption")
    pieces, previous_end = [], 0
    for index, span in enumerate(sorted(phrases, key=lambda item: item[0])):
        if not isinstance(span, (tuple, list)) or len(span) != 3:
            raise ValueError(f"`phrases[{index}]` must be (start, end, num_boxes); got {span!r}.")
        start, end, num_boxes = span
        if not (previous_end <= start < end <= len(caption)):
            raise ValueError(
                f"`phrases[{index}]` = {span!r} must be a non-empty span of the caption (length {len(caption)}) that "
                "does not overlap the previous one."
            )
        pieces += [caption[previous_end:start], PHRASE_START, caption[start:end], PHRASE_END]
        pieces.append(multi_grounding_answer(num_boxes))
        previous_end = end
    pieces.append(caption[previous_end:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------------------
# Output parsing
# ---------------------------------------------------------------------------------------------------------------

_ASSISTANT_RE = re.compile(r"ASSISTANT\s*:", re.IGNORECASE)
# A phrase may not contain another <p> or </p>, so "<p>a</p> and <p>b</p><roi>" attaches only "b".
_GROUNDING_RE = re.compile(
    r"(?:<p>(?P<phrase>(?:(?!</?p>).)*?)</p>\s*)?<roi>(?P<regions>(?:(?!</?roi>).)*?)</roi>", re.DOTALL
)
_REGION_INDEX_RE = re.compile(r"<r(\d+)>")


class GromaProcessor(ProcessorMixin):
    r"""Groma processor: a [`GromaImageProcessor`] plus the LLM tokenizer extended with Groma's new tokens.

    Args:
        image_processor: resizes to the model's square input and normalizes (`GromaImageProcessor`).
        tokenizer: the LLM tokenizer with `groma_special_tokens(max_region_num)` appended in order (consecutive ids;
            build it with `add_groma_special_tokens`). A missing pad token is set to `[PAD]`.
        chat_template: jinja template; defaults to the released conversation (`GROMA_CHAT_TEMPLATE`).
        num_image_tokens: `<image>` placeholders per image, `(image_size / patch_size / 2) ** 2` (256 for groma-7b).
        max_region_num: region slots per prompt, the model's `max_region_num` (100 for groma-7b).

    Model inputs produced by `__call__` (B = batch):
        pixel_values: (B, 3, S, S) float32, ImageNet-normalized.
        input_ids, attention_mask: (B, L) int64. The prompt's `<image>` is expanded to `<img>` + `<image>` x
            num_image_tokens + `</img>`, its `<region>` to `<r0><region><r1><region>...<r{M-1}><region>`.
        labels: (B, L) int64, only when answers are given (or the text marks them with `<sep>`): -100 on the prompt
            and padding; the answer tokens and the `</s>` after them are supervised.
        refer_boxes: (B, R, 4) float32 user boxes, normalized xyxy in [0, 1] of the image, zero-padded, and
            refer_boxes_mask: (B, R) bool; only when boxes are given. User box i sits in region slot i.
        ground_boxes, ground_boxes_mask: same layout, training targets for `<ground_box>` placeholders.
        image_sizes: (B, 2) int64 original (height, width), for post-processing.
    """

    text_kwargs = {"padding": True}

    # Static helpers, also reachable as methods: `processor.rec_prompt("the dog")`.
    build_prompt = staticmethod(build_prompt)
    rec_prompt = staticmethod(rec_prompt)
    multi_grounding_prompt = staticmethod(multi_grounding_prompt)
    region_caption_prompt = staticmethod(region_caption_prompt)
    grounded_caption_prompt = staticmethod(grounded_caption_prompt)
    grounded_chat_prompt = staticmethod(grounded_chat_prompt)
    rec_answer = staticmethod(rec_answer)
    multi_grounding_answer = staticmethod(multi_grounding_answer)
    region_caption_answer = staticmethod(region_caption_answer)
    grounded_caption_answer = staticmethod(grounded_caption_answer)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_image_tokens: int = 256,
        max_region_num: int = 100,
        **kwargs,
    ):
        for name, value in (("num_image_tokens", num_image_tokens), ("max_region_num", max_region_num)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if tokenizer is None:
            raise ValueError("`tokenizer` is required: pass the LLM tokenizer extended with Groma's new tokens.")
        if image_processor is None:
            raise ValueError("`image_processor` is required: pass a GromaImageProcessor.")
        self.num_image_tokens = num_image_tokens
        self.max_region_num = max_region_num
        self.image_token = IMAGE_TOKEN
        self._new_token_ids = self._check_tokenizer(tokenizer, max_region_num)
        self.image_token_id = self._new_token_ids[IMAGE_TOKEN]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template or GROMA_CHAT_TEMPLATE)

    @staticmethod
    def _check_tokenizer(tokenizer: Any, max_region_num: int) -> dict[str, int]:
        tokens = groma_special_tokens(max_region_num)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        unknown_id = tokenizer.unk_token_id
        missing = [token for token, token_id in zip(tokens, ids) if token_id is None or token_id == unknown_id]
        if missing:
            raise ValueError(
                f"`tokenizer` lacks {len(missing)} of Groma's new tokens (e.g. {missing[:4]}); add them with "
                f"`add_groma_special_tokens(tokenizer, max_region_num={max_region_num})`."
            )
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(
                "`tokenizer` must hold Groma's new tokens with consecutive ids in the released order "
                "(`groma_special_tokens(max_region_num)`), because the model maps new token j to text vocab + j; "
                f"got ids {ids[:6]}... Build it with `add_groma_special_tokens` on the plain LLM tokenizer."
            )
        if tokenizer.eos_token != EOS_TOKEN:
            raise ValueError(
                f"`tokenizer` must use {EOS_TOKEN!r} as eos token (Llama/Vicuna); got {tokenizer.eos_token!r}."
            )
        return dict(zip(tokens, ids))

    @property
    def region_index_token_ids(self) -> list[int]:
        """Token ids of `<r0>` ... `<r{max_region_num - 1}>`."""
        return [self._new_token_ids[f"<r{index}>"] for index in range(self.max_region_num)]

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_sizes",
            "refer_boxes",
            "refer_boxes_mask",
            "ground_boxes",
            "ground_boxes_mask",
        ]

    # -----------------------------------------------------------------------------------------------------------
    # __call__
    # -----------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        boxes: Any = None,
        ground_boxes: Any = None,
        answers: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Turn images, user boxes and text into Groma model inputs (see the class docstring for the outputs).

        Args:
            images: one image per sample (PIL / numpy / tensor; a list, or a list of one-image lists).
            text: per sample, either a bare user query (wrapped into the released conversation with `build_prompt`)
                or a full prompt holding exactly one `<image>` and one `<region>` (e.g. from `apply_chat_template`).
                Without `images`, text is tokenized as is (e.g. a completion) and may not hold `<image>`/`<region>`.
            boxes: user boxes per image, `boxes[image][box] = [x1, y1, x2, y2]`, absolute pixels of the ORIGINAL
                image (None / [] for an image without boxes). Each `<refer_box>` in the text becomes `<r{i}>` for the
                next box i, so the text must hold exactly one `<refer_box>` and one `<refer_feat>` per box.
            ground_boxes: training targets per image, same format; the text (with its answer) must hold one
                `<ground_box>` per box, in order.
            answers: one answer per sample for training; appended after the prompt (which must end with
                `ASSISTANT:`) and supervised in `labels` together with the closing `</s>`. Alternatively the text
                may mark supervised spans itself with pairs of `<sep>` (the released multi-turn format); give such a
                sample the answer None when others in the batch have answers.
            return_tensors: "pt" (default), "np" or None (Python lists).
            **kwargs: tokenizer options (`padding` (default True), `truncation`, `max_length`, `padding_side`,
                `pad_to_multiple_of`, `add_special_tokens`, `return_offsets_mapping`) and image processor options
                (`size`, ...).
        """
        if videos is not None or audio is not None:
            raise ValueError("Groma takes images and text only; got `videos` or `audio`.")
        if images is None and text is None:
            raise ValueError("Pass `images` and/or `text` to GromaProcessor.")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None; got {return_tensors!r}.")
        merged = self._merge_kwargs(ProcessingKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        data: dict[str, Any] = {}
        image_sizes = None
        if images is not None:
            self._check_one_image_per_sample(images)
            image_inputs = self.image_processor(images, return_tensors="pt", **images_kwargs)
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_sizes"] = image_inputs["image_sizes"]
            image_sizes = validate_image_sizes(image_inputs["image_sizes"])

        texts = self._normalize_text(text)
        batch_size = len(image_sizes) if image_sizes is not None else len(texts)
        if texts is not None and len(texts) != batch_size:
            raise ValueError(
                f"`text` has {len(texts)} samples but `images` has {batch_size} images; Groma takes exactly one image "
                "per sample."
            )
        answer_list = self._normalize_answers(answers, texts)

        for name, value in (("boxes", boxes), ("ground_boxes", ground_boxes)):
            if value is not None and image_sizes is None:
                raise ValueError(f"`{name}` needs `images`: boxes are absolute pixels of each image.")
        refer_pixel_boxes = ground_pixel_boxes = None
        if boxes is not None:
            refer_pixel_boxes = validate_pixel_boxes(boxes, image_sizes, "boxes", max_boxes=self.max_region_num)
            if any(len(image_boxes) for image_boxes in refer_pixel_boxes):
                data["refer_boxes"], data["refer_boxes_mask"] = self._normalize_boxes(refer_pixel_boxes, image_sizes)
        if ground_boxes is not None:
            ground_pixel_boxes = validate_pixel_boxes(ground_boxes, image_sizes, "ground_boxes")
            if any(len(image_boxes) for image_boxes in ground_pixel_boxes):
                data["ground_boxes"], data["ground_boxes_mask"] = self._normalize_boxes(
                    ground_pixel_boxes, image_sizes
                )

        if texts is not None:
            prompts, replacements = [], []
            for index, sample_text in enumerate(texts):
                num_refer = 0 if refer_pixel_boxes is None else len(refer_pixel_boxes[index])
                num_ground = 0 if ground_pixel_boxes is None else len(ground_pixel_boxes[index])
                prompt, sample_replacements = self._expand_text(
                    index, sample_text, answer_list[index], num_refer, num_ground, image_sizes is not None
                )
                prompts.append(prompt)
                replacements.append(sample_replacements)
            data.update(self._tokenize(prompts, text_kwargs, return_tensors is not None))
            if text_kwargs.get("return_offsets_mapping"):
                data["text_replacement_offsets"] = replacements

        return BatchFeature(self._convert(data, return_tensors), skip_tensor_conversion=["text_replacement_offsets"])

    @staticmethod
    def _check_one_image_per_sample(images: Any) -> None:
        if isinstance(images, (list, tuple)):
            for index, item in enumerate(images):
                if isinstance(item, (list, tuple)) and len(item) != 1:
                    raise ValueError(
                        f"`images[{index}]` holds {len(item)} images; Groma takes exactly one image per sample."
                    )

    @staticmethod
    def _normalize_text(text: Any) -> list[str] | None:
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if isinstance(text, (list, tuple)) and text and all(isinstance(sample, str) for sample in text):
            return list(text)
        raise TypeError(f"`text` must be a string or a non-empty list of strings; got {text!r:.80}.")

    @staticmethod
    def _normalize_answers(answers: Any, texts: list[str] | None) -> list[str | None]:
        if answers is None:
            return [None] * (0 if texts is None else len(texts))
        if texts is None:
            raise ValueError("`answers` needs `text`: pass the prompts the answers respond to.")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, (list, tuple)) or not all(
            answer is None or isinstance(answer, str) for answer in answers
        ):
            raise TypeError(
                f"`answers` must be a string or a list of strings (None for a sample whose text marks its answers "
                f"with `<sep>` pairs); got {answers!r:.80}."
            )
        if len(answers) != len(texts):
            raise ValueError(f"`answers` has {len(answers)} entries but `text` has {len(texts)}; give one per sample.")
        return list(answers)

    @staticmethod
    def _normalize_boxes(
        pixel_boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute pixel xyxy per image -> (B, R, 4) normalized xyxy (zero-padded) and a (B, R) bool mask.

        The image is resized to a square without keeping the aspect ratio, so a box normalized by the original
        width and height is also the normalized box of the model input.
        """
        num_slots = max(len(image_boxes) for image_boxes in pixel_boxes)
        normalized = torch.zeros((len(pixel_boxes), num_slots, 4), dtype=torch.float32)
        mask = torch.zeros((len(pixel_boxes), num_slots), dtype=torch.bool)
        for image_index, (image_boxes, (height, width)) in enumerate(zip(pixel_boxes, image_sizes)):
            count = len(image_boxes)
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            normalized[image_index, :count] = (image_boxes / scale).clamp(0.0, 1.0)
            mask[image_index, :count] = True
        return normalized, mask

    def _expand_text(
        self,
        index: int,
        text: str,
        answer: str | None,
        num_refer: int,
        num_ground: int,
        has_image: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """Wrap a bare query, append the answer, then expand `<image>`, `<region>` and `<refer_box>` in one pass.

        Returns the expanded text and, per replacement, `{"type", "span", "new_span", "text", "replacement"}` (the
        offsets transformers uses to align `return_assistant_tokens_mask` with the unexpanded chat text).
        """
        where = f"text[{index}]"
        for token in (IMAGE_START, IMAGE_END):
            if token in text:
                raise ValueError(
                    f"`{where}` already contains {token!r}; pass the unexpanded prompt with one {IMAGE_TOKEN!r}."
                )
        num_images, num_regions = text.count(IMAGE_TOKEN), text.count(REGION_TOKEN)
        if has_image:
            if num_images == 0 and num_regions == 0:
                text = build_prompt(text)
            elif num_images != 1 or num_regions != 1:
                raise ValueError(
                    f"`{where}` must hold exactly one {IMAGE_TOKEN!r} and one {REGION_TOKEN!r} (the released first "
                    f"turn {FIRST_USER_TURN!r}); got {num_images} and {num_regions}. Pass a bare query to have the "
                    "conversation built for you, or use `build_prompt` / `apply_chat_template`."
                )
        elif num_images or num_regions:
            raise ValueError(f"`{where}` holds {IMAGE_TOKEN!r}/{REGION_TOKEN!r} but no `images` were passed.")

        if answer is not None:
            if SEP_TOKEN in text:
                raise ValueError(
                    f"`{where}` already marks answers with {SEP_TOKEN!r}; pass either `answers` or the markers."
                )
            if not text.rstrip().endswith(GENERATION_PROMPT):
                raise ValueError(
                    f"`answers` need prompts ending with {GENERATION_PROMPT!r}, but `{where}` ends with "
                    f"{text[-30:]!r}. Use `build_prompt` or `apply_chat_template(..., add_generation_prompt=True)`."
                )
            text = f"{text.rstrip()} {SEP_TOKEN}{answer}{SEP_TOKEN}{EOS_TOKEN}"

        counts = {token: text.count(token) for token in (REFER_BOX_TOKEN, REFER_FEAT_TOKEN, GROUND_BOX_TOKEN)}
        for token in (REFER_BOX_TOKEN, REFER_FEAT_TOKEN):
            if counts[token] != num_refer:
                raise ValueError(
                    f"`boxes` has {num_refer} box(es) for sample {index} but `{where}` holds {counts[token]} "
                    f"{token!r}; write `<roi><refer_box></roi><refer_feat>` once per box (e.g. with "
                    "`region_caption_prompt()`) and pass one box per placeholder."
                )
        if counts[GROUND_BOX_TOKEN] != num_ground:
            raise ValueError(
                f"`ground_boxes` has {num_ground} box(es) for sample {index} but the text and answer hold "
                f"{counts[GROUND_BOX_TOKEN]} {GROUND_BOX_TOKEN!r}; give one ground-truth box per placeholder."
            )

        region_slots = "".join(f"<r{slot}>{REGION_TOKEN}" for slot in range(self.max_region_num))
        image_slots = IMAGE_START + IMAGE_TOKEN * self.num_image_tokens + IMAGE_END
        pattern = re.compile("|".join(re.escape(token) for token in (IMAGE_TOKEN, REGION_TOKEN, REFER_BOX_TOKEN)))
        pieces, replacements, last, offset, next_box = [], [], 0, 0, 0
        for match in pattern.finditer(text):
            token = match.group()
            if token == IMAGE_TOKEN:
                replacement, kind = image_slots, "image"
            elif token == REGION_TOKEN:
                replacement, kind = region_slots, "region"
            else:
                replacement, kind = f"<r{next_box}>", "refer_box"
                next_box += 1
            start, end = match.span()
            pieces += [text[last:start], replacement]
            replacements.append(
                {
                    "type": kind,
                    "span": (start, end),
                    "new_span": (start + offset, start + offset + len(replacement)),
                    "text": token,
                    "replacement": replacement,
                }
            )
            offset += len(replacement) - (end - start)
            last = end
        pieces.append(text[last:])
        return "".join(pieces), replacements

    def _tokenize(self, prompts: list[str], text_kwargs: dict[str, Any], needs_equal_lengths: bool) -> dict[str, Any]:
        """Tokenize unpadded, turn `<sep>` pairs into labels and drop them, check placeholder counts, then pad."""
        padding = text_kwargs.pop("padding", True)
        # Given to the tokenizer without truncation, `max_length` would switch truncation on; it is for padding then.
        max_length = text_kwargs.pop("max_length", None)
        if text_kwargs.get("truncation") and max_length is not None:
            text_kwargs["max_length"] = max_length
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        padding_side = text_kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets", "return_attention_mask"):
            text_kwargs.pop(key, None)
        encodings = self.tokenizer(prompts, padding=False, return_attention_mask=True, **text_kwargs)
        with_offsets = "offset_mapping" in encodings

        sep_id = self._new_token_ids[SEP_TOKEN]
        eos_id = self.tokenizer.eos_token_id
        counted = {
            self._new_token_ids[token]: token
            for token in (IMAGE_TOKEN, REGION_TOKEN, REFER_FEAT_TOKEN, GROUND_BOX_TOKEN, SEP_TOKEN)
        }
        rows = {"input_ids": [], "attention_mask": [], "labels": [], "offset_mapping": []}
        any_labels = False
        for index, prompt in enumerate(prompts):
            ids = list(encodings["input_ids"][index])
            attention = list(encodings["attention_mask"][index])
            for token_id, token in counted.items():
                if ids.count(token_id) != prompt.count(token):
                    raise ValueError(
                        f"`text[{index}]` lost {token!r} tokens in tokenization ({prompt.count(token)} in the text, "
                        f"{ids.count(token_id)} in `input_ids`), most likely to truncation: raise `max_length` or pass "
                        "truncation=False."
                    )
            separators = [position for position, token_id in enumerate(ids) if token_id == sep_id]
            if len(separators) % 2:
                raise ValueError(
                    f"`text[{index}]` holds {len(separators)} {SEP_TOKEN!r} markers; supervised spans need pairs."
                )
            labels = [IGNORE_INDEX] * len(ids)
            for open_position, close_position in zip(separators[0::2], separators[1::2]):
                labels[open_position + 1 : close_position] = ids[open_position + 1 : close_position]
                # The released loaders also supervise the `</s>` that closes each answer.
                if close_position + 1 < len(ids) and ids[close_position + 1] == eos_id:
                    labels[close_position + 1] = eos_id
            any_labels = any_labels or bool(separators)
            keep = [position for position, token_id in enumerate(ids) if token_id != sep_id]
            rows["input_ids"].append([ids[position] for position in keep])
            rows["attention_mask"].append([attention[position] for position in keep])
            rows["labels"].append([labels[position] for position in keep])
            if with_offsets:
                offsets = encodings["offset_mapping"][index]
                rows["offset_mapping"].append([tuple(offsets[position]) for position in keep])

        unpadded_lengths = [len(ids) for ids in rows["input_ids"]]
        padded = self.tokenizer.pad(
            {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_tensors=None,
        )
        result = {"input_ids": list(padded["input_ids"]), "attention_mask": list(padded["attention_mask"])}
        extra_rows = {"labels": (rows["labels"], IGNORE_INDEX)} if any_labels else {}
        if with_offsets:
            extra_rows["offset_mapping"] = (rows["offset_mapping"], (0, 0))
        for key, (values, pad_value) in extra_rows.items():
            result[key] = []
            for row, length, padded_ids in zip(values, unpadded_lengths, result["input_ids"]):
                filler = [pad_value] * (len(padded_ids) - length)
                result[key].append(filler + row if padding_side == "left" else row + filler)
        if needs_equal_lengths and len({len(ids) for ids in result["input_ids"]}) > 1:
            raise ValueError(
                "The samples tokenize to different lengths; pass padding=True (the default) to return tensors."
            )
        return result

    @staticmethod
    def _convert(data: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
        integer_keys = ("input_ids", "attention_mask", "labels", "offset_mapping")
        converted = {}
        for key, value in data.items():
            if key == "text_replacement_offsets":
                converted[key] = value
                continue
            if key in integer_keys:
                value = torch.tensor(value, dtype=torch.int64)
            if return_tensors == "np":
                value = value.numpy()
            elif return_tensors is None:
                value = value.tolist()
            converted[key] = value
        return converted

    # -----------------------------------------------------------------------------------------------------------
    # Post-processing
    # -----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _id_rows(generated_ids: Any) -> list[list[int]]:
        if isinstance(generated_ids, (torch.Tensor, np.ndarray)):
            if generated_ids.ndim not in (1, 2):
                raise ValueError(
                    f"`generated_ids` must have shape (batch, length) or (length,); got {tuple(generated_ids.shape)}."
                )
            rows = generated_ids.tolist()
            return [rows] if generated_ids.ndim == 1 else rows
        if isinstance(generated_ids, (list, tuple)) and generated_ids:
            if all(isinstance(token, int) for token in generated_ids):
                return [list(generated_ids)]
            if all(isinstance(row, (list, tuple)) for row in generated_ids):
                return [list(row) for row in generated_ids]
        raise TypeError("`generated_ids` must be a (batch, length) tensor / array or a list of token id lists.")

    def _decode_answers(
        self, generated_ids: Any, skip_prompt: bool | int, skip_special_tokens: bool, **decode_kwargs
    ) -> list[str]:
        """Decode each row; drop the prompt (a token count, or up to the last `ASSISTANT:` when True) and cut at `</s>`."""
        rows = self._id_rows(generated_ids)
        if not isinstance(skip_prompt, bool):
            if not isinstance(skip_prompt, int) or skip_prompt < 0:
                raise ValueError(
                    f"`skip_prompt` must be a bool or a prompt length >= 0 (e.g. `inputs['input_ids'].shape[1]`); "
                    f"got {skip_prompt!r}."
                )
            rows = [row[skip_prompt:] for row in rows]
        texts = []
        for row in rows:
            text = self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens, **decode_kwargs)
            if skip_prompt is True:
                matches = list(_ASSISTANT_RE.finditer(text))
                if matches:
                    text = text[matches[-1].end() :]
            # Once the prompt is gone, the first `</s>` ends the answer (what follows is batch padding).
            if skip_prompt is not False and not skip_special_tokens:
                text = text.split(EOS_TOKEN)[0]
            texts.append(text)
        return texts

    def _region_lookup(
        self, region_boxes: Any, region_mask: Any, image_sizes: Any, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        boxes = torch.as_tensor(np.asarray(region_boxes) if isinstance(region_boxes, list) else region_boxes)
        if boxes.ndim != 3 or boxes.shape[0] != batch_size or boxes.shape[-1] != 4:
            raise ValueError(
                f"`region_boxes` must have shape (batch={batch_size}, num_slots, 4) (normalized xyxy from the model); "
                f"got {tuple(boxes.shape)}."
            )
        mask = torch.as_tensor(np.asarray(region_mask) if isinstance(region_mask, list) else region_mask)
        if tuple(mask.shape) != tuple(boxes.shape[:2]):
            raise ValueError(
                f"`region_mask` must have shape {tuple(boxes.shape[:2])} like `region_boxes`; got {tuple(mask.shape)}."
            )
        sizes = validate_image_sizes(image_sizes)
        if len(sizes) != batch_size:
            raise ValueError(f"`image_sizes` has {len(sizes)} entries for {batch_size} generated sequences.")
        return boxes.detach().float().cpu(), mask.detach().bool().cpu(), sizes

    def post_process_grounding(
        self,
        generated_ids: Any,
        region_boxes: Any,
        region_mask: Any,
        image_sizes: Any,
        skip_prompt: bool | int = True,
    ) -> list[list[dict[str, Any]]]:
        """Map `<p>phrase</p><roi><rA><rB></roi>` spans of generated answers to boxes in pixels of the original image.

        Args:
            generated_ids: (B, T) token ids from `generate` (prompt included or not).
            region_boxes: (B, M, 4) normalized xyxy of each region slot (`model.get_regions(...)` or the model output).
            region_mask: (B, M) bool, False for empty slots.
            image_sizes: (B, 2) original (height, width), the processor's `image_sizes`.
            skip_prompt: True (default) parses only the text after the last `ASSISTANT:`; an int drops that many
                leading tokens (the prompt length); False parses everything.

        Returns:
            Per sample, one dict per `<roi>` span in order: `{"phrase": str | None, "boxes": [[x1, y1, x2, y2], ...]
            absolute pixel xyxy of the ORIGINAL image, "region_indices": [k, ...]}`. A `<roi>` right after
            `<p>...</p>` takes that phrase, otherwise None. Indices of empty/masked or out-of-range slots are dropped
            from both lists.
        """
        answers = self._decode_answers(generated_ids, skip_prompt, skip_special_tokens=False)
        boxes, mask, sizes = self._region_lookup(region_boxes, region_mask, image_sizes, len(answers))
        results = []
        for sample, answer in enumerate(answers):
            height, width = sizes[sample]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            entries = []
            for match in _GROUNDING_RE.finditer(answer):
                phrase = match.group("phrase")
                phrase = " ".join(phrase.split()) if phrase is not None else None
                indices = [int(k) for k in _REGION_INDEX_RE.findall(match.group("regions")) if int(k) < mask.shape[1]]
                indices = [k for k in indices if bool(mask[sample, k])]
                entries.append(
                    {
                        "phrase": phrase or None,
                        "boxes": [(boxes[sample, k] * scale).tolist() for k in indices],
                        "region_indices": indices,
                    }
                )
            results.append(entries)
        return results

    def post_process_rec(
        self,
        generated_ids: Any,
        region_boxes: Any,
        region_mask: Any,
        image_sizes: Any,
        skip_prompt: bool | int = True,
    ) -> list[list[float] | None]:
        """Referring expression comprehension: per sample the box of the first valid generated `<rK>`, else None.

        As the released `eval_rec.py`: the first region token of the answer counts; pixel xyxy of the original image.
        """
        answers = self._decode_answers(generated_ids, skip_prompt, skip_special_tokens=False)
        boxes, mask, sizes = self._region_lookup(region_boxes, region_mask, image_sizes, len(answers))
        results = []
        for sample, answer in enumerate(answers):
            height, width = sizes[sample]
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            box = None
            for index in (int(k) for k in _REGION_INDEX_RE.findall(answer)):
                if index < mask.shape[1] and bool(mask[sample, index]):
                    box = (boxes[sample, index] * scale).tolist()
                    break
            results.append(box)
        return results

    def post_process_image_text_to_text(
        self,
        generated_outputs: Any,
        skip_special_tokens: bool = True,
        skip_prompt: bool | int = False,
        **kwargs,
    ) -> list[str]:
        """Decode generated ids to clean text: special tokens (`<p>`, `<roi>`, `<rK>`, ...) removed, spaces tidied.

        `skip_prompt` works as in `post_process_grounding` but defaults to False, as the image-text-to-text pipeline
        expects. With `skip_special_tokens=False` the raw decoded text is returned. `kwargs` go to `tokenizer.decode`.
        """
        texts = self._decode_answers(generated_outputs, skip_prompt, skip_special_tokens, **kwargs)
        if not skip_special_tokens:
            return texts
        # Groma's tokens are special in tokenizers built by `add_groma_special_tokens`, but a tokenizer that added them
        # as plain tokens would leave them in the text.
        pattern = re.compile("|".join(re.escape(token) for token in (*GROMA_BASE_NEW_TOKENS, EOS_TOKEN)) + r"|<r\d+>")
        return [" ".join(pattern.sub(" ", text).split()) for text in texts]
