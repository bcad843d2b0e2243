"""Processor for u-LLaVA: images / videos + chat text -> model inputs; model outputs -> masks, boxes, tags, text.

u-LLaVA (ullava.txt, sections 3.1-3.3; released formats in reference/original_repos.md section 4c-4d):

* an image is `<image>` in the first user turn (`<image>\\n{query}`), expanded to `<img_beg>` + 256 `<image_patch>`
  + `</img_end>`; a video is `<video>`, expanded to `<vid_beg>` + (8 + 256) `<video_patch>` + `</vid_end>`;
* the `conv_sep2` conversation: "{system} USER: {query} ASSISTANT: {answer}</s>USER: ...", system prompt "A chat
  between a curious human and an artificial intelligence assistant. ..." (note: human's);
* answers of the pixel / region tasks: `Sure. Mask: [SEG]; Location: [LOC]; [tag]{category}[/tag].` (RES),
  `Sure. Info: [SEG]; Location: [LOC]; [tag]{class}[/tag].` (semantic), the salient variant with an explanation;
* two image branches: CLIP (white-padded square, 224, `ULlavaImageProcessor`) and SAM (longest side 1024, padded
  bottom/right, transformers' `SamImageProcessor`);
* boxes: absolute pixel xyxy of the original image in, normalized xyxy of the white-padded square inside the model
  (`(x + pad_x) / max(h, w)`, released `pad_normalize_xyxy`), absolute pixel xyxy out of `post_process_grounding`.

The new tokens are repeated here from `configuration_ullava.py` (the two folders may not import each other; a test
checks that they agree).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature, SamImageProcessor
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .chat_templates import MESSAGE_TEXT, jinja_literal
from .image_processing_ullava import ULlavaImageProcessor, pad_to_square_offsets
from .region_inputs import validate_image_sizes, validate_pixel_boxes

__all__ = [
    "ULLAVA_CHAT_TEMPLATE",
    "ULLAVA_NEW_TOKENS",
    "ULLAVA_SYSTEM_PROMPT",
    "ULlavaProcessor",
    "add_ullava_special_tokens",
    "build_prompt",
    "rec_answer",
    "rec_prompt",
    "res_answer",
    "res_prompt",
    "salient_answer",
    "salient_prompt",
    "semantic_answer",
    "semantic_prompt",
    "video_caption_prompt",
]

ULLAVA_NEW_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "<image_patch>",
    "<video_patch>",
    "<img_beg>",
    "</img_end>",
    "<vid_beg>",
    "</vid_end>",
    "[SEG]",
    "[LOC]",
    "[tag]",
    "[/tag]",
)
PAD_TOKEN, IMAGE_PATCH, VIDEO_PATCH, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END = ULLAVA_NEW_TOKENS[:7]
SEG_TOKEN, LOC_TOKEN, TAG_START, TAG_END = ULLAVA_NEW_TOKENS[7:]
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
EOS_TOKEN = "</s>"
IGNORE_INDEX = -100


def add_ullava_special_tokens(tokenizer: Any) -> Any:
    """Append u-LLaVA's 11 tokens to an LLM tokenizer (e.g. Vicuna's) in the released order, as special tokens.

    Afterwards token j of `ULLAVA_NEW_TOKENS` has id `len(original tokenizer) + j`, which the model assumes (its
    `text_config.vocab_size` is `len(original) + 11`). Raises when only some of them are present already.
    """
    vocab = tokenizer.get_vocab()
    present = [token for token in ULLAVA_NEW_TOKENS if token in vocab]
    if present and len(present) != len(ULLAVA_NEW_TOKENS):
        raise ValueError(
            f"`tokenizer` already has {len(present)} of u-LLaVA's {len(ULLAVA_NEW_TOKENS)} tokens ({present[:3]}...); "
            "start from the plain LLM tokenizer so the new tokens get consecutive ids in the released order."
        )
    if not present:
        tokenizer.add_tokens(list(ULLAVA_NEW_TOKENS), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Conversation (released `conv_sep2`) and task templates (released `dataset/templates/*.json`, paper appendix)
# ---------------------------------------------------------------------------------------------------------------

ULLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
GENERATION_PROMPT = "ASSISTANT:"

RES_INSTRUCTIONS: tuple[str, ...] = (
    "Can you segment and locate the {} in this image?",
    "Please segment and locate the {} in this image.",
    "What is {} in this image? Please respond with segmentation mask and the bounding box.",
    "What is {} in this image? Please output mask and bbox.",
    "Find the {} in the picture.",
    "Can you help me to find the {} in the image?",
    "Output the mask and bounding box (bbox) of the {} in the image?",
    "Look at the image, segment and locate the {} in the picture.",
    "Where is {}?",
)
REC_INSTRUCTIONS: tuple[str, ...] = (
    "Please locate the {} in this image.",
    "Where is the {}? Please output the bounding box.",
    "Output the bounding box (bbox) of the {} in the image.",
)
SALIENT_INSTRUCTIONS: tuple[str, ...] = (
    "Find the salient object in the image.",
    "What is salient one in this image?",
    "Look at the image, segment the main object in the picture and explain.",
)
VIDEO_CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the video briefly.",
    "What happens in the video?",
)


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


def res_prompt(expression: str, seed: int | None = None) -> str:
    """Referring segmentation + grounding: `"Can you segment and locate the {expression} in this image?"`."""
    return _choose(RES_INSTRUCTIONS, seed).format(_check_phrase(expression, "expression"))


def rec_prompt(expression: str, seed: int | None = None) -> str:
    """Referring expression comprehension (box only): `"Please locate the {expression} in this image."`."""
    return _choose(REC_INSTRUCTIONS, seed).format(_check_phrase(expression, "expression"))


def semantic_prompt(category: str, seed: int | None = None) -> str:
    """Semantic segmentation of every instance of a class (answer: `semantic_answer`): the RES templates with the
    class name, as the released semantic-segmentation data sets do (`"Can you segment and locate the {category} in
    this image?"`)."""
    return _choose(RES_INSTRUCTIONS, seed).format(_check_phrase(category, "category"))


def salient_prompt(seed: int | None = None) -> str:
    """Salient object segmentation: `"Find the salient object in the image."`."""
    return _choose(SALIENT_INSTRUCTIONS, seed)


def video_caption_prompt(seed: int | None = None) -> str:
    """Video captioning: `"Describe the video briefly."`."""
    return _choose(VIDEO_CAPTION_INSTRUCTIONS, seed)


def res_answer(tag: str) -> str:
    """`"Sure. Mask: [SEG]; Location: [LOC]; [tag]{tag}[/tag]."` (one mask and one box target)."""
    return f"Sure. Mask: {SEG_TOKEN}; Location: {LOC_TOKEN}; {TAG_START}{_check_phrase(tag, 'tag')}{TAG_END}."


def semantic_answer(tag: str) -> str:
    """`"Sure. Info: [SEG]; Location: [LOC]; [tag]{tag}[/tag]."` (semantic segmentation: the union of a class)."""
    return f"Sure. Info: {SEG_TOKEN}; Location: {LOC_TOKEN}; {TAG_START}{_check_phrase(tag, 'tag')}{TAG_END}."


def rec_answer(tag: str) -> str:
    """`"Sure. Location: [LOC]; [tag]{tag}[/tag]."` (one box target)."""
    return f"Sure. Location: {LOC_TOKEN}; {TAG_START}{_check_phrase(tag, 'tag')}{TAG_END}."


def salient_answer(tag: str, reason: str) -> str:
    """`"Sure. Mask: [SEG]; Location: [LOC]; [tag]{tag}[/tag]. Explanation: {reason}"`."""
    return f"{res_answer(tag)} Explanation: {_check_phrase(reason, 'reason')}"


def build_prompt(
    query: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
    visual: str | None = IMAGE_TOKEN,
) -> str:
    """The released `conv_sep2` prompt, ending with `ASSISTANT:`.

    `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {query} ASSISTANT:` -- the image (or `<video>`) goes at
    the start of the first user turn; `visual=None` builds a text-only prompt.
    """
    if not isinstance(query, str):
        raise TypeError(f"`query` must be a string; got {type(query).__name__}.")
    if visual not in (IMAGE_TOKEN, VIDEO_TOKEN, None):
        raise ValueError(f"`visual` must be {IMAGE_TOKEN!r}, {VIDEO_TOKEN!r} or None; got {visual!r}.")
    if isinstance(history, str):
        raise TypeError("`history` must be a sequence of (user, assistant) pairs, not a string.")
    turns = [*history, (query, None)]
    parts = [ULLAVA_SYSTEM_PROMPT if system is None else system, " "]
    for index, turn in enumerate(turns):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise ValueError(f"`history[{index}]` must be a (user, assistant) pair; got {turn!r}.")
        user, assistant = turn
        if visual is not None and (IMAGE_TOKEN in user or VIDEO_TOKEN in user):
            raise ValueError(
                f"`history`/`query` already hold {IMAGE_TOKEN!r}/{VIDEO_TOKEN!r}; pass `visual=None` to keep your own "
                "placement, or the bare text to have it placed at the start of the first turn."
            )
        prefix = f"{visual}\n" if index == 0 and visual is not None else ""
        parts.append(f"USER: {prefix}{user} {GENERATION_PROMPT}")
        if assistant is not None:
            parts.append(f" {assistant}{EOS_TOKEN}")
    return "".join(parts)


# The same string as `build_prompt`, for `apply_chat_template`: an {"type": "image"} / {"type": "video"} entry puts
# `<image>\n` / `<video>\n` before the text of its message. `{% generation %}` marks assistant text for trl.
ULLAVA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=" + jinja_literal(ULLAVA_SYSTEM_PROMPT) + ", started=false, visual='') -%}"
    "{%- for message in messages -%}"
    "{%- set ns.visual = '' -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}" + MESSAGE_TEXT + "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.visual = ns.visual + '<image>\\n' -%}"
    "{%- elif item['type'] == 'video' -%}{%- set ns.visual = ns.visual + '<video>\\n' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = text -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if not ns.started -%}{{- ns.system + ' ' -}}{%- set ns.started = true -%}{%- endif -%}"
    "{{- 'USER: ' + ns.visual + text + ' " + GENERATION_PROMPT + "' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' -}}{% generation %}{{- text + " + jinja_literal(EOS_TOKEN) + " -}}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('u-LLaVA: unknown role ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
)

_TAG_RE = re.compile(r"\[tag\](.*?)\[/tag\]", re.DOTALL)
_ASSISTANT_RE = re.compile(r"ASSISTANT\s*:", re.IGNORECASE)


def _to_rgb_array(image: Any, where: str) -> np.ndarray:
    """Any PIL image / (H, W) / (H, W, C) / (C, H, W) array or tensor with C in {1, 3, 4} -> (H, W, 3) uint8 RGB.

    Grey is replicated, RGBA is composited onto white (the CLIP branch pads with white too), palette images go
    through PIL.
    """
    if isinstance(image, PIL.Image.Image):
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = PIL.Image.alpha_composite(background, rgba)
        return np.array(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or not np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_:
        raise TypeError(
            f"`{where}` must be a PIL image or a numeric numpy array / torch tensor; got {type(image).__name__}."
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"`{where}` must be 2-D or 3-D (H, W[, C]); got shape {image.shape}.")
    if image.shape[-1] not in (1, 3, 4) and image.shape[0] in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"`{where}` needs 1, 3 or 4 channels (grey, RGB, RGBA); got shape {image.shape}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"`{where}` is empty (shape {image.shape}).")
    if np.issubdtype(image.dtype, np.floating) and image.size and float(np.nanmax(image)) <= 1.0:
        raise ValueError(f"`{where}` looks like floats in [0, 1]; pass 0..255 pixel values (e.g. `image * 255`).")
    array = np.clip(image, 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float32) / 255.0
        array = (array[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return array


class ULlavaProcessor(ProcessorMixin):
    r"""u-LLaVA processor: a CLIP branch (`ULlavaImageProcessor`), a SAM branch (`SamImageProcessor`) and the LLM
    tokenizer with `ULLAVA_NEW_TOKENS` appended in order.

    Args:
        image_processor: `ULlavaImageProcessor` (white pad to square, resize to `config.image_size`, CLIP norm).
        sam_image_processor: transformers' `SamImageProcessor` with `size={"longest_edge": S_sam}` and
            `pad_size={"height": S_sam, "width": S_sam}` (1024 for SAM ViT-H).
        tokenizer: LLM tokenizer with the 11 new tokens at its last ids (`add_ullava_special_tokens`).
        chat_template: jinja template; defaults to `ULLAVA_CHAT_TEMPLATE` (released `conv_sep2`).
        num_image_tokens: `<image_patch>` tokens per image, `(image_size / patch)^2` (256).
        num_video_frames: frames per video (8); clips with another count are resampled uniformly.

    Model inputs produced by `__call__`:
        input_ids, attention_mask: `(B, L)` int64. labels: `(B, L)`, only with `answers` (-100 on prompt/padding).
        pixel_values: `(num_images, 3, S, S)` CLIP inputs; image_sizes: `(num_images, 2)` original (height, width);
        sam_pixel_values: `(num_images, 3, S_sam, S_sam)`; rows follow the samples that have an image, in order.
        pixel_values_videos: `(num_videos, T, 3, S, S)`.
        seg_masks: list (one per sample) of `(k_b, H_b, W_b)` float {0, 1} tensors, only with `ground_masks`.
        loc_boxes, loc_boxes_mask: `(B, N, 4)` normalized xyxy of the white-padded square and `(B, N)` bool, only
            with `ground_boxes`.
    """

    text_kwargs = {"padding": True}

    build_prompt = staticmethod(build_prompt)
    res_prompt = staticmethod(res_prompt)
    rec_prompt = staticmethod(rec_prompt)
    salient_prompt = staticmethod(salient_prompt)
    semantic_prompt = staticmethod(semantic_prompt)
    video_caption_prompt = staticmethod(video_caption_prompt)
    res_answer = staticmethod(res_answer)
    semantic_answer = staticmethod(semantic_answer)
    rec_answer = staticmethod(rec_answer)
    salient_answer = staticmethod(salient_answer)

    def __init__(
        self,
        image_processor: Any = None,
        sam_image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        num_image_tokens: int = 256,
        num_video_frames: int = 8,
        **kwargs,
    ):
        for name, value in (("num_image_tokens", num_image_tokens), ("num_video_frames", num_video_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if image_processor is None or sam_image_processor is None or tokenizer is None:
            raise ValueError(
                "ULlavaProcessor needs `image_processor` (ULlavaImageProcessor), `sam_image_processor` "
                "(SamImageProcessor) and `tokenizer` (with add_ullava_special_tokens)."
            )
        self.num_image_tokens = num_image_tokens
        self.num_video_frames = num_video_frames
        self._new_token_ids = self._check_tokenizer(tokenizer)
        self.image_token = IMAGE_TOKEN
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN
        super().__init__(
            image_processor, sam_image_processor, tokenizer, chat_template=chat_template or ULLAVA_CHAT_TEMPLATE
        )

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any) -> ULlavaProcessor:
        """The processor a `ULlavaConfig` expects, around `tokenizer`: the CLIP branch at `config.image_size`, the SAM
        branch at `config.sam_image_size` (longest edge, padded square), `config.num_image_tokens` and
        `config.num_video_frames`."""
        side = config.sam_image_size
        return cls(
            ULlavaImageProcessor(size={"height": config.image_size, "width": config.image_size}),
            SamImageProcessor(size={"longest_edge": side}, pad_size={"height": side, "width": side}),
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            num_video_frames=config.num_video_frames,
        )

    @staticmethod
    def _check_tokenizer(tokenizer: Any) -> dict[str, int]:
        ids = tokenizer.convert_tokens_to_ids(list(ULLAVA_NEW_TOKENS))
        missing = [t for t, i in zip(ULLAVA_NEW_TOKENS, ids) if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(
                f"`tokenizer` lacks u-LLaVA tokens {missing[:4]}...; add them with `add_ullava_special_tokens`."
            )
        if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != len(tokenizer) - 1:
            raise ValueError(
                "`tokenizer` must hold u-LLaVA's tokens as its LAST ids, consecutive, in the released order "
                f"(`ULLAVA_NEW_TOKENS`); got ids {ids} for a vocabulary of {len(tokenizer)}."
            )
        if tokenizer.eos_token != EOS_TOKEN:
            raise ValueError(
                f"`tokenizer` must use {EOS_TOKEN!r} as eos token (Llama/Vicuna); got {tokenizer.eos_token!r}."
            )
        return dict(zip(ULLAVA_NEW_TOKENS, ids))

    @property
    def seg_token_id(self) -> int:
        return self._new_token_ids[SEG_TOKEN]

    @property
    def loc_token_id(self) -> int:
        return self._new_token_ids[LOC_TOKEN]

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_sizes",
            "sam_pixel_values",
            "pixel_values_videos",
            "seg_masks",
            "loc_boxes",
            "loc_boxes_mask",
        ]

    @property
    def num_video_tokens(self) -> int:
        return self.num_video_frames + self.num_image_tokens

    # -----------------------------------------------------------------------------------------------------------
    # __call__
    # -----------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        answers: str | list[str] | None = None,
        ground_masks: Any = None,
        ground_boxes: Any = None,
        audio: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Turn images / videos and text into u-LLaVA inputs (see the class docstring for the outputs).

        Args:
            images: per sample one image or None (a list aligned with `text`; a single image or a list of images
                when every sample has one). PIL, numpy or tensor; grey / RGBA / palette are converted to RGB.
            text: per sample a bare user query (wrapped with `build_prompt`, `<image>`/`<video>` placed for you) or
                a full prompt (holding `ASSISTANT:`, e.g. from `apply_chat_template`) with one `<image>` / `<video>`
                per visual input of the sample.
            videos: per sample a list / array of frames or None; `num_video_frames` frames are taken uniformly.
            answers: per sample the answer to train on (appended after the prompt, supervised with its `</s>`).
            ground_masks: per sample a list of `(H, W)` {0, 1} masks at the ORIGINAL image size, one per `[SEG]` of
                its answer (None / [] for none).
            ground_boxes: per sample a list of `[x1, y1, x2, y2]` absolute pixel boxes of the ORIGINAL image, one per
                `[LOC]` of its answer.
            return_tensors: "pt" (default) or None.
            **kwargs: tokenizer options (`padding`, `padding_side`, `truncation`, `max_length`).
        """
        if audio is not None:
            raise ValueError("u-LLaVA takes images, videos and text; got `audio`.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors` must be 'pt' or None; got {return_tensors!r}.")
        texts = self._normalize_text(text)
        if texts is None:
            raise ValueError("Pass `text` (one prompt per sample) to ULlavaProcessor.")
        batch_size = len(texts)
        sample_images = self._per_sample(images, "images", batch_size, is_video=False)
        sample_videos = self._per_sample(videos, "videos", batch_size, is_video=True)
        answer_list = self._normalize_answers(answers, batch_size)
        merged = self._merge_kwargs(ProcessingKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs = merged["text_kwargs"]

        data: dict[str, Any] = {}
        image_rows = [index for index, image in enumerate(sample_images) if image is not None]
        image_sizes: list[tuple[int, int]] = []
        if image_rows:
            arrays = [_to_rgb_array(sample_images[index], f"images[{index}]") for index in image_rows]
            clip_inputs = self.image_processor(arrays, return_tensors="pt")
            sam_inputs = self.sam_image_processor(arrays, return_tensors="pt")
            data["pixel_values"] = clip_inputs["pixel_values"]
            data["image_sizes"] = clip_inputs["image_sizes"]
            data["sam_pixel_values"] = sam_inputs["pixel_values"]
            image_sizes = validate_image_sizes(clip_inputs["image_sizes"])
        video_rows = [index for index, video in enumerate(sample_videos) if video is not None]
        if video_rows:
            data["pixel_values_videos"] = torch.stack(
                [self._video_pixels(sample_videos[index], index) for index in video_rows]
            )

        prompts = [
            self._expand_text(index, texts[index], sample_images[index] is not None, sample_videos[index] is not None)
            for index in range(batch_size)
        ]
        data.update(self._tokenize(prompts, answer_list, text_kwargs))

        sizes_by_sample = {sample: image_sizes[row] for row, sample in enumerate(image_rows)}
        full_texts = [prompt + (answer or "") for prompt, answer in zip(prompts, answer_list)]
        if ground_masks is not None:
            data["seg_masks"] = self._ground_masks(ground_masks, batch_size, sizes_by_sample, full_texts)
        if ground_boxes is not None:
            data["loc_boxes"], data["loc_boxes_mask"] = self._ground_boxes(
                ground_boxes, batch_size, sizes_by_sample, full_texts
            )
        if return_tensors is None:
            data = {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in data.items()}
        return BatchFeature(data, skip_tensor_conversion=["seg_masks"])

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
    def _normalize_answers(answers: Any, batch_size: int) -> list[str | None]:
        if answers is None:
            return [None] * batch_size
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, (list, tuple)) or not all(a is None or isinstance(a, str) for a in answers):
            raise TypeError(f"`answers` must be a string or a list of strings; got {answers!r:.80}.")
        if len(answers) != batch_size:
            raise ValueError(f"`answers` has {len(answers)} entries but `text` has {batch_size}; give one per sample.")
        return list(answers)

    @staticmethod
    def _per_sample(values: Any, name: str, batch_size: int, is_video: bool) -> list[Any]:
        if values is None:
            return [None] * batch_size
        single = isinstance(values, PIL.Image.Image) or (
            isinstance(values, (np.ndarray, torch.Tensor)) and values.ndim == (4 if is_video else 3)
        )
        if single or (
            is_video and isinstance(values, (list, tuple)) and values and isinstance(values[0], PIL.Image.Image)
        ):
            values = [values]
        if isinstance(values, (np.ndarray, torch.Tensor)):
            values = list(values)
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"`{name}` must be a list with one entry per sample (None for none); got {type(values)}.")
        if len(values) != batch_size:
            raise ValueError(
                f"`{name}` has {len(values)} entries but `text` has {batch_size} samples; give one per sample "
                "(None for a sample without one)."
            )
        if is_video:
            return list(values)
        # `apply_chat_template` and trl's collators pass images as one list per sample.
        flat = []
        for index, value in enumerate(values):
            if isinstance(value, (list, tuple)):
                if len(value) > 1:
                    raise ValueError(f"`images[{index}]` holds {len(value)} images; u-LLaVA takes one per sample.")
                value = value[0] if value else None
            flat.append(value)
        return flat

    def _video_pixels(self, video: Any, index: int) -> torch.Tensor:
        """`num_video_frames` frames sampled uniformly (first and last included) -> `(T, 3, S, S)`."""
        frames = list(video) if not isinstance(video, (np.ndarray, torch.Tensor)) else list(video)
        if len(frames) == 0:
            raise ValueError(f"`videos[{index}]` has no frames.")
        picks = np.linspace(0, len(frames) - 1, self.num_video_frames).round().astype(int)
        arrays = [_to_rgb_array(frames[pick], f"videos[{index}][{pick}]") for pick in picks]
        return self.image_processor(arrays, return_tensors="pt")["pixel_values"]

    def _expand_text(self, index: int, text: str, has_image: bool, has_video: bool) -> str:
        where = f"text[{index}]"
        for token in (IMAGE_START, IMAGE_PATCH, VIDEO_START, VIDEO_PATCH):
            if token in text:
                raise ValueError(f"`{where}` already contains {token!r}; pass the prompt with `<image>` / `<video>`.")
        if GENERATION_PROMPT not in text:
            placed = IMAGE_TOKEN in text or VIDEO_TOKEN in text
            visual = None if placed else IMAGE_TOKEN if has_image else VIDEO_TOKEN if has_video else None
            text = build_prompt(text, visual=visual)
        for token, present in ((IMAGE_TOKEN, has_image), (VIDEO_TOKEN, has_video)):
            count = text.count(token)
            if count != int(present):
                raise ValueError(
                    f"`{where}` holds {count} {token!r} but the sample has {int(present)} "
                    f"{'image' if token == IMAGE_TOKEN else 'video'}; u-LLaVA takes at most one of each per sample, "
                    "written once in the prompt."
                )
        image_slots = IMAGE_START + IMAGE_PATCH * self.num_image_tokens + IMAGE_END
        video_slots = VIDEO_START + VIDEO_PATCH * self.num_video_tokens + VIDEO_END
        return text.replace(IMAGE_TOKEN, image_slots).replace(VIDEO_TOKEN, video_slots)

    def _tokenize(self, prompts: list[str], answers: list[str | None], text_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Prompt (with BOS) and answer (` {answer}</s>`, no BOS) are tokenized separately, so the labels cover
        exactly the answer tokens; then padded."""
        padding = text_kwargs.pop("padding", True)
        padding_side = text_kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        max_length = text_kwargs.pop("max_length", None)
        truncation = text_kwargs.pop("truncation", None)
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        add_special_tokens = text_kwargs.pop("add_special_tokens", None)
        rows, label_rows = [], []
        for index, (prompt, answer) in enumerate(zip(prompts, answers)):
            # A rendered chat template does not carry BOS, so BOS is added unless the caller says otherwise.
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens is not False)["input_ids"]
            labels = [IGNORE_INDEX] * len(ids)
            if answer is not None:
                if not prompt.rstrip().endswith(GENERATION_PROMPT):
                    raise ValueError(
                        f"`answers` need prompts ending with {GENERATION_PROMPT!r}; `text[{index}]` ends with "
                        f"{prompt[-30:]!r}."
                    )
                answer_ids = self.tokenizer(f" {answer}{EOS_TOKEN}", add_special_tokens=False)["input_ids"]
                ids = ids + answer_ids
                labels = labels + answer_ids
            if truncation and max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"`text[{index}]` is {len(ids)} tokens, more than max_length={max_length}; truncating would cut "
                    "visual tokens or the answer. Raise `max_length`."
                )
            rows.append(ids)
            label_rows.append(labels)
        longest = max(len(ids) for ids in rows)
        target = longest if padding in (True, "longest") else max(longest, max_length or 0)
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if padding is False and len({len(ids) for ids in rows}) > 1:
            raise ValueError("The samples tokenize to different lengths; pass padding=True to return tensors.")
        pad_id = self.tokenizer.pad_token_id
        result: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in zip(rows, label_rows):
            filler = target - len(ids)
            if padding_side == "left":
                result["input_ids"].append([pad_id] * filler + ids)
                result["attention_mask"].append([0] * filler + [1] * len(ids))
                result["labels"].append([IGNORE_INDEX] * filler + labels)
            else:
                result["input_ids"].append(ids + [pad_id] * filler)
                result["attention_mask"].append([1] * len(ids) + [0] * filler)
                result["labels"].append(labels + [IGNORE_INDEX] * filler)
        output = {key: torch.tensor(value, dtype=torch.int64) for key, value in result.items()}
        if all(answer is None for answer in answers):
            del output["labels"]
        return output

    @staticmethod
    def _ground_masks(
        ground_masks: Any, batch_size: int, sizes: dict[int, tuple[int, int]], texts: list[str]
    ) -> list[torch.Tensor]:
        if not isinstance(ground_masks, (list, tuple)) or len(ground_masks) != batch_size:
            raise ValueError(
                f"`ground_masks` must be a list with one entry per sample ({batch_size}): a list of (H, W) masks at "
                "the original image size, one per `[SEG]` (None / [] for none)."
            )
        result = []
        for index, masks in enumerate(ground_masks):
            count = texts[index].count(SEG_TOKEN)
            masks = [] if masks is None else list(masks)
            if len(masks) not in (0, count):
                raise ValueError(
                    f"`ground_masks[{index}]` has {len(masks)} mask(s) but sample {index} has {count} `[SEG]`; give "
                    "one mask per `[SEG]` in order."
                )
            if not masks:
                height, width = sizes.get(index, (0, 0))
                result.append(torch.zeros(0, height, width))
                continue
            if index not in sizes:
                raise ValueError(f"`ground_masks[{index}]` needs an image for sample {index}; pass it in `images`.")
            stacked = torch.stack([torch.as_tensor(np.asarray(mask)) for mask in masks]).float()
            if tuple(stacked.shape[-2:]) != sizes[index] or stacked.ndim != 3:
                raise ValueError(
                    f"`ground_masks[{index}]` must hold (H, W) = {sizes[index]} masks (the original image size); got "
                    f"shape {tuple(stacked.shape)}."
                )
            if not bool(((stacked == 0) | (stacked == 1)).all()):
                raise ValueError(f"`ground_masks[{index}]` must be binary (0/1 or bool).")
            result.append(stacked)
        return result

    @staticmethod
    def _ground_boxes(
        ground_boxes: Any, batch_size: int, sizes: dict[int, tuple[int, int]], texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(ground_boxes, (list, tuple)) or len(ground_boxes) != batch_size:
            raise ValueError(
                f"`ground_boxes` must be a list with one entry per sample ({batch_size}): a list of pixel "
                "[x1, y1, x2, y2] boxes, one per `[LOC]` (None / [] for none)."
            )
        for index, boxes in enumerate(ground_boxes):
            if boxes is not None and len(boxes) and index not in sizes:
                raise ValueError(f"`ground_boxes[{index}]` needs an image for sample {index}; pass it in `images`.")
        # Samples without an image carry no boxes (checked above); any size passes their empty entry.
        pixel_boxes = validate_pixel_boxes(
            list(ground_boxes), [sizes.get(index, (1, 1)) for index in range(batch_size)], "ground_boxes"
        )
        per_sample = []
        for index, pixel in enumerate(pixel_boxes):
            count = texts[index].count(LOC_TOKEN)
            if pixel.shape[0] != count and not (pixel.shape[0] == 0 and ground_boxes[index] is None):
                raise ValueError(
                    f"`ground_boxes[{index}]` has {pixel.shape[0]} box(es) but sample {index} has {count} `[LOC]`; "
                    "give one box per `[LOC]` in order (None for a sample without box targets)."
                )
            if pixel.shape[0] == 0:
                per_sample.append(torch.zeros(0, 4))
                continue
            height, width = sizes[index]
            left, top = pad_to_square_offsets(height, width)
            side = max(height, width)
            offset = torch.tensor([left, top, left, top], dtype=torch.float32)
            per_sample.append((pixel + offset) / side)
        num_slots = max(1, max(boxes.shape[0] for boxes in per_sample))
        loc_boxes = torch.zeros(batch_size, num_slots, 4)
        loc_mask = torch.zeros(batch_size, num_slots, dtype=torch.bool)
        for index, boxes in enumerate(per_sample):
            loc_boxes[index, : boxes.shape[0]] = boxes
            loc_mask[index, : boxes.shape[0]] = True
        return loc_boxes, loc_mask

    # -----------------------------------------------------------------------------------------------------------
    # Post-processing
    # -----------------------------------------------------------------------------------------------------------

    def post_process_segmentation(
        self, mask_logits: Any, image_sizes: Any = None, threshold: float = 0.0
    ) -> list[torch.BoolTensor]:
        """Per sample `(k_b, H_b, W_b)` logits (`outputs.pred_masks` / `prediction.mask_logits`) -> bool masks.

        With `image_sizes` (`(B, 2)` original (height, width), one per sample), logits of another size are resized
        bilinearly to it first, so masks always come out at the original image size.
        """
        if not isinstance(mask_logits, (list, tuple)):
            raise TypeError("`mask_logits` must be a list with one (k, H, W) tensor per sample (model `pred_masks`).")
        sizes = validate_image_sizes(image_sizes) if image_sizes is not None else None
        if sizes is not None and len(sizes) != len(mask_logits):
            raise ValueError(
                f"`image_sizes` has {len(sizes)} entries but `mask_logits` has {len(mask_logits)} samples; give one "
                "(height, width) per sample."
            )
        results = []
        for index, logits in enumerate(mask_logits):
            logits = torch.as_tensor(logits).float()
            if logits.ndim != 3:
                raise ValueError(f"`mask_logits[{index}]` must have shape (k, H, W); got {tuple(logits.shape)}.")
            if sizes is not None and tuple(logits.shape[-2:]) != sizes[index]:
                if logits.shape[0]:
                    logits = torch.nn.functional.interpolate(
                        logits[:, None], size=sizes[index], mode="bilinear", align_corners=False
                    )[:, 0]
                else:
                    logits = logits.new_zeros(0, *sizes[index])
            results.append(logits > threshold)
        return results

    def post_process_grounding(self, boxes: Any, image_sizes: Any) -> list[list[list[float]]]:
        """Normalized xyxy boxes of the white-padded square -> absolute pixel xyxy of the original image, clipped.

        Args:
            boxes: per sample a `(n_b, 4)` tensor / list (`prediction.boxes`, or `prediction.rec_boxes` with one box
                or None per sample), or a `(B, n, 4)` tensor.
            image_sizes: `(B, 2)` original (height, width) of each sample's image.
        """
        sizes = validate_image_sizes(image_sizes)
        if isinstance(boxes, torch.Tensor) and boxes.ndim == 3:
            boxes = list(boxes)
        if not isinstance(boxes, (list, tuple)) or len(boxes) != len(sizes):
            raise ValueError(
                f"`boxes` must hold one entry per image ({len(sizes)}), each (n, 4) normalized xyxy; got "
                f"{type(boxes).__name__} of length {len(boxes) if isinstance(boxes, (list, tuple)) else '?'}."
            )
        results = []
        for index, (sample_boxes, (height, width)) in enumerate(zip(boxes, sizes)):
            if sample_boxes is None:
                results.append([])
                continue
            tensor = torch.as_tensor(sample_boxes, dtype=torch.float32).reshape(-1, 4)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"`boxes[{index}]` contains NaN or inf.")
            side = max(height, width)
            left, top = pad_to_square_offsets(height, width)
            pixel = tensor * side - torch.tensor([left, top, left, top], dtype=torch.float32)
            pixel[:, 0::2] = pixel[:, 0::2].clamp(0, width)
            pixel[:, 1::2] = pixel[:, 1::2].clamp(0, height)
            results.append(pixel.tolist())
        return results

    def _decode(self, generated: Any, skip_prompt: bool) -> list[str]:
        if isinstance(generated, str):
            return [generated]
        if isinstance(generated, (list, tuple)) and all(isinstance(item, str) for item in generated):
            return list(generated)
        rows = generated.tolist() if isinstance(generated, (torch.Tensor, np.ndarray)) else generated
        if rows and isinstance(rows[0], int):
            rows = [rows]
        texts = []
        for row in rows:
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            if skip_prompt:
                matches = list(_ASSISTANT_RE.finditer(text))
                if matches:
                    text = text[matches[-1].end() :]
                text = text.split(EOS_TOKEN)[0]
            texts.append(text)
        return texts

    def post_process_tags(self, generated: Any, skip_prompt: bool = True) -> list[list[str]]:
        """The `[tag]...[/tag]` phrases of each answer (ids from `generate` or decoded strings), whitespace tidied."""
        return [
            [" ".join(tag.split()) for tag in _TAG_RE.findall(text)] for text in self._decode(generated, skip_prompt)
        ]

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, skip_prompt: bool = False, **kwargs
    ) -> list[str]:
        """Decode to clean text: u-LLaVA tokens removed and spaces tidied (raw text with `skip_special_tokens=False`)."""
        texts = self._decode(generated_outputs, skip_prompt)
        if not skip_special_tokens:
            return texts
        pattern = re.compile("|".join(re.escape(t) for t in (*ULLAVA_NEW_TOKENS, EOS_TOKEN, "<s>", "<pad>")))
        return [" ".join(pattern.sub(" ", text).split()) for text in texts]
