"""Tests of Groma's image processor and processor (hf_regionmm/processing/{image_,}processing_groma.py).

A word-level tokenizer with Groma's new tokens, 112x112 inputs, 16 image tokens and 8 region slots stand in for
Vicuna, 448x448, 256 and 100. Expectations are computed by hand from the released formats (reference/
original_repos.md Sec. 1c/1d): pixel values of constant images, normalized boxes, slot counts, prompt strings, label
masks and the boxes parsed out of a hand-written answer.
"""

from __future__ import annotations

import re

import jinja2
import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.processing import processing_groma
from hf_regionmm.processing.image_processing_groma import GromaImageProcessor
from hf_regionmm.processing.processing_groma import (
    GROMA_SYSTEM_PROMPT,
    GromaProcessor,
    add_groma_special_tokens,
    build_prompt,
    groma_special_tokens,
    grounded_caption_answer,
    grounded_caption_prompt,
    multi_grounding_answer,
    multi_grounding_prompt,
    rec_answer,
    rec_prompt,
    region_caption_prompt,
)

IMAGE_SIZE, NUM_IMAGE_TOKENS, MAX_REGIONS = 112, 16, 8
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])

_TEXT = " ".join(
    [
        GROMA_SYSTEM_PROMPT,
        "USER: ASSISTANT: Here is an image with region crops from it. Image: Regions:",
        "Thank you for the image! How can I assist you with it?",
        *processing_groma.REC_INSTRUCTIONS,
        *processing_groma.MULTI_GROUNDING_INSTRUCTIONS,
        *processing_groma.REGION_CAPTION_INSTRUCTIONS,
        *processing_groma.GROUNDED_CAPTION_INSTRUCTIONS,
        "a dog cat red ball sits near on grass two cats play with and",
    ]
)
WORDS = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]", _TEXT.lower())))


def constant_pixel_values(rgb: tuple[int, int, int]) -> torch.Tensor:
    """What a constant image must become: (c / 255 - mean) / std in every pixel, shape (3, S, S)."""
    values = (torch.tensor(rgb, dtype=torch.float32) / 255 - MEAN) / STD
    return values[:, None, None].expand(3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS, extra_special_tokens=groma_special_tokens(MAX_REGIONS))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return GromaProcessor(
        GromaImageProcessor(size=IMAGE_SIZE), tokenizer, num_image_tokens=NUM_IMAGE_TOKENS, max_region_num=MAX_REGIONS
    )


@pytest.fixture(scope="module")
def red_image():
    return PIL.Image.new("RGB", (200, 100), (255, 0, 0))  # width 200, height 100


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


# ------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------------------------


def test_special_tokens_match_released_order_and_model_config(tokenizer):
    from hf_regionmm.modeling.configuration_groma import groma_special_tokens as config_special_tokens

    tokens = groma_special_tokens(100)
    assert len(tokens) == 114
    assert tokens[:14] == ["[PAD]", "<sep>", "<img>", "</img>", "<roi>", "</roi>", "<p>", "</p>", "<image>"] + [
        "<region>",
        "<refer_box>",
        "<ground_box>",
        "<refer_feat>",
        "[grounding]",
    ]
    assert tokens[14] == "<r0>" and tokens[-1] == "<r99>"
    assert tokens == config_special_tokens(100)
    # New token j has id text-vocab + j: the extras are the last ids of the tiny tokenizer.
    base = len(tokenizer) - len(groma_special_tokens(MAX_REGIONS))
    assert tokenizer.convert_tokens_to_ids(groma_special_tokens(MAX_REGIONS)) == list(range(base, len(tokenizer)))


def test_add_groma_special_tokens_appends_in_order():
    plain = build_word_tokenizer(["a", "dog"])
    base = len(plain)
    add_groma_special_tokens(plain, max_region_num=4)
    assert plain.convert_tokens_to_ids(groma_special_tokens(4)) == list(range(base, base + 18))
    assert plain.decode(plain("a <p> dog </p> <roi> <r3> </roi>")["input_ids"], skip_special_tokens=True) == "a dog"
    assert add_groma_special_tokens(plain, max_region_num=4) is plain and len(plain) == base + 18
    with pytest.raises(ValueError, match="`tokenizer` lacks"):
        GromaProcessor(GromaImageProcessor(), build_word_tokenizer(["a"]), max_region_num=4)
    # The tokenizer has <r0>..<r3> but the processor wants 8 slots.
    with pytest.raises(ValueError, match="`tokenizer` lacks 4"):
        GromaProcessor(GromaImageProcessor(), plain, max_region_num=8)


# ------------------------------------------------------------------------------------------------------------------
# Image processor
# ------------------------------------------------------------------------------------------------------------------


def test_constant_images_of_mixed_modes_match_hand_computation():
    image_processor = GromaImageProcessor(size=IMAGE_SIZE)
    rgb = PIL.Image.new("RGB", (70, 50), (30, 120, 200))
    grey = PIL.Image.new("L", (33, 40), 90)
    rgba = np.zeros((20, 24, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)  # fully transparent: the alpha channel is dropped, not composited onto white
    channels_first = torch.full((3, 64, 48), 250, dtype=torch.uint8)
    grey_array = np.full((30, 45), 7, dtype=np.uint8)

    outputs = image_processor([rgb, grey, rgba, channels_first, grey_array], return_tensors="pt")

    assert outputs["pixel_values"].shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert outputs["pixel_values"].dtype == torch.float32
    expected = [(30, 120, 200), (90, 90, 90), (10, 20, 30), (250, 250, 250), (7, 7, 7)]
    for index, rgb_value in enumerate(expected):
        torch.testing.assert_close(outputs["pixel_values"][index], constant_pixel_values(rgb_value))
    assert outputs["image_sizes"].dtype == torch.int64
    assert outputs["image_sizes"].tolist() == [[50, 70], [40, 33], [20, 24], [64, 48], [30, 45]]


def test_resize_is_bicubic_without_keeping_aspect_ratio():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    pixel_values = GromaImageProcessor(size=IMAGE_SIZE)(image, return_tensors="pt")["pixel_values"][0]
    # The released pipeline: PIL resize((S, S)) (bicubic), then ImageNet normalization.
    reference = torch.from_numpy(np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.BICUBIC)).copy())
    reference = (reference.permute(2, 0, 1).float() / 255 - MEAN[:, None, None]) / STD[:, None, None]
    grey_levels = ((pixel_values - reference) * STD[:, None, None] * 255).abs()
    assert grey_levels.max() <= 3.0 and grey_levels.mean() < 0.5


def test_default_image_processor_is_the_released_448_preprocessing():
    image_processor = GromaImageProcessor()
    assert (image_processor.size.height, image_processor.size.width) == (448, 448)
    assert tuple(image_processor.image_mean) == (0.485, 0.456, 0.406)
    assert tuple(image_processor.image_std) == (0.229, 0.224, 0.225)
    assert image_processor.resample == PIL.Image.BICUBIC and not image_processor.do_center_crop
    outputs = image_processor(PIL.Image.new("RGB", (10, 20), (0, 0, 0)), return_tensors="pt")
    assert outputs["pixel_values"].shape == (1, 3, 448, 448)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((5, 6, 7), dtype=np.uint8), "cannot find a channel axis"),
        (np.zeros((6, 7, 2), dtype=np.uint8), "cannot find a channel axis"),
        ([PIL.Image.new("RGB", (4, 4)), object()], r"`images` entry 1"),
        (np.zeros((4, 4, 3), dtype=bool), "numeric"),
        ([], "`images` must be"),
    ],
)
def test_bad_images_raise_naming_images(images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GromaImageProcessor(size=IMAGE_SIZE)(images, return_tensors="pt")


def test_non_square_size_is_rejected():
    with pytest.raises(ValueError, match="`size` must be a square"):
        GromaImageProcessor(size={"height": 112, "width": 224})
    with pytest.raises(ValueError, match="`size` must be a square"):
        GromaImageProcessor(size=IMAGE_SIZE)(PIL.Image.new("RGB", (8, 8)), size={"shortest_edge": 64})


# ------------------------------------------------------------------------------------------------------------------
# Prompts and templates
# ------------------------------------------------------------------------------------------------------------------


def test_build_prompt_is_the_released_conversation():
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Here is an image with region crops from it. "
        "Image: <image>. Regions: <region>. ASSISTANT: Thank you for the image! How can I assist you with it?</s>"
        "USER: Locate <p>the dog</p> in the image. ASSISTANT:"
    )
    assert build_prompt(rec_prompt("the dog")) == expected
    with_history = build_prompt("What is it?", history=[("Hi", "Hello")], system="Be brief.")
    assert with_history.startswith("Be brief. USER: Here is")
    assert with_history.endswith("?</s>USER: Hi ASSISTANT: Hello</s>USER: What is it? ASSISTANT:")


def test_chat_template_renders_exactly_build_prompt(processor, red_image):
    query = rec_prompt("the dog")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == build_prompt(query)

    multi_turn = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "user", "content": "What is it?"},
    ]
    rendered = processor.apply_chat_template(multi_turn, add_generation_prompt=True)
    assert rendered == build_prompt("What is it?", history=[("Hi", "Hello")], system="Be brief.")

    # The rendered chat and the bare query tokenize identically.
    from_template = processor(
        images=red_image, text=processor.apply_chat_template(messages, add_generation_prompt=True)
    )
    from_query = processor(images=red_image, text=query)
    assert torch.equal(from_template["input_ids"], from_query["input_ids"])

    with pytest.raises(jinja2.TemplateError, match="exactly one"):
        processor.apply_chat_template([{"role": "user", "content": "no image"}], add_generation_prompt=True)


def test_task_templates():
    assert rec_prompt("the dog") == "Locate <p>the dog</p> in the image."
    seeded = rec_prompt("the dog", seed=3)
    assert seeded == rec_prompt("the dog", seed=3)
    assert seeded in [template.format("<p>the dog</p>") for template in processing_groma.REC_INSTRUCTIONS]
    assert multi_grounding_prompt("cat") == "Locate all <p>cat</p> in this image."
    assert region_caption_prompt() == "What is <roi><refer_box></roi><refer_feat>?"
    assert region_caption_prompt(detailed=True).startswith("Can you provide me with a detailed description of <roi>")
    assert grounded_caption_prompt() == "[grounding]Give me a concise description of the image."
    assert rec_answer() == "<roi><ground_box></roi>"
    assert multi_grounding_answer(2) == "<roi><ground_box><ground_box></roi>"
    assert (
        grounded_caption_answer("a dog and two cats", [(10, 18, 2), (0, 5, 1)])
        == "<p>a dog</p><roi><ground_box></roi> and <p>two cats</p><roi><ground_box><ground_box></roi>"
    )
    with pytest.raises(ValueError, match="overlap"):
        grounded_caption_answer("a dog", [(0, 3, 1), (2, 5, 1)])


# ------------------------------------------------------------------------------------------------------------------
# __call__
# ------------------------------------------------------------------------------------------------------------------


def test_boxes_are_normalized_by_the_original_non_square_size(processor, red_image):
    tall = PIL.Image.new("RGB", (40, 80), (0, 0, 0))  # width 40, height 80
    outputs = processor(
        images=[red_image, tall],
        text=["What is <roi><refer_box></roi><refer_feat> near <roi><refer_box></roi><refer_feat>?", "What is it?"],
        boxes=[[[20, 10, 120, 60], [0, 0, 200, 100]], []],
    )
    expected = torch.tensor([[[0.1, 0.1, 0.6, 0.6], [0.0, 0.0, 1.0, 1.0]], [[0.0] * 4, [0.0] * 4]])
    torch.testing.assert_close(outputs["refer_boxes"], expected)
    assert outputs["refer_boxes_mask"].tolist() == [[True, True], [False, False]]
    assert outputs["image_sizes"].tolist() == [[100, 200], [80, 40]]
    assert outputs["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert "ground_boxes" not in outputs and "labels" not in outputs
    no_boxes = processor(images=red_image, text="What is it?")
    assert "refer_boxes" not in no_boxes and "refer_boxes_mask" not in no_boxes
    # Without text (e.g. for `model.get_regions`): image and box tensors only.
    regions_only = processor(images=red_image, boxes=[[[20, 10, 120, 60]]])
    assert set(regions_only) == {"pixel_values", "image_sizes", "refer_boxes", "refer_boxes_mask"}
    torch.testing.assert_close(regions_only["refer_boxes"], expected[:1, :1])


def test_prompt_expansion_slot_counts(processor, tokenizer, red_image):
    outputs = processor(images=red_image, text=region_caption_prompt(), boxes=[[[20, 10, 120, 60]]])
    ids = outputs["input_ids"][0].tolist()
    assert outputs["attention_mask"].tolist() == [[1] * len(ids)]
    assert ids.count(token_id(tokenizer, "<image>")) == NUM_IMAGE_TOKENS
    start, end = ids.index(token_id(tokenizer, "<img>")), ids.index(token_id(tokenizer, "</img>"))
    assert end - start == NUM_IMAGE_TOKENS + 1
    assert ids[start + 1 : end] == [token_id(tokenizer, "<image>")] * NUM_IMAGE_TOKENS
    region = token_id(tokenizer, "<region>")
    assert ids.count(region) == MAX_REGIONS
    first = ids.index(region) - 1
    expected_slots = [id_ for k in range(MAX_REGIONS) for id_ in (token_id(tokenizer, f"<r{k}>"), region)]
    assert ids[first : first + 2 * MAX_REGIONS] == expected_slots
    # `<roi><refer_box></roi><refer_feat>` became `<roi><r0></roi><refer_feat>` for user box 0.
    assert token_id(tokenizer, "<refer_box>") not in ids
    roi = ids.index(token_id(tokenizer, "<roi>"))
    assert ids[roi : roi + 4] == [token_id(tokenizer, token) for token in ("<roi>", "<r0>", "</roi>", "<refer_feat>")]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_labels_mask_prompt_and_padding(processor, tokenizer, red_image):
    answers = ["A red ball.", "Two cats play on the grass with a dog."]
    outputs = processor(images=[red_image, red_image], text=["What is it?", "What is it?"], answers=answers)
    input_ids, labels, attention = outputs["input_ids"], outputs["labels"], outputs["attention_mask"]
    assert labels.shape == input_ids.shape and token_id(tokenizer, "<sep>") not in input_ids
    for row, answer in enumerate(answers):
        supervised = labels[row] != -100
        expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[row][supervised].tolist() == expected
        assert torch.equal(labels[row][supervised], input_ids[row][supervised])
        # The supervised span is the answer at the end of the real tokens, right after "ASSISTANT:".
        num_tokens = int(attention[row].sum())
        assert supervised.nonzero().flatten().tolist() == list(range(num_tokens - len(expected), num_tokens))
    assert attention[0].sum() < attention[1].sum() and not (labels[0][attention[0] == 0] != -100).any()

    length = input_ids.shape[1] + 3
    fixed = processor(
        images=[red_image] * 2, text=["What is it?"] * 2, answers=answers, padding="max_length", max_length=length
    )
    assert fixed["labels"].shape == (2, length) and (fixed["labels"][:, -3:] == -100).all()
    assert torch.equal(fixed["labels"][:, : length - 3], labels)

    left = processor(images=[red_image, red_image], text=["What is it?"] * 2, answers=answers, padding_side="left")
    assert left["attention_mask"][0, 0] == 0 and left["labels"][0, 0] == -100
    assert torch.equal(left["labels"][1], outputs["labels"][1])


def test_sep_markers_supervise_every_marked_answer(processor, tokenizer, red_image):
    history_text = build_prompt(
        "What is it?", history=[("Locate all <p>cat</p> in this image.", "<sep>Two cats<sep>")]
    )
    outputs = processor(images=red_image, text=f"{history_text} <sep>A dog<sep></s>")
    supervised = outputs["labels"][0][outputs["labels"][0] != -100].tolist()
    expected = tokenizer("two cats </s> a dog </s>", add_special_tokens=False)["input_ids"]
    assert supervised == expected


def test_batch_mixes_answers_with_a_sample_that_marks_its_own(processor, tokenizer, red_image):
    marked = build_prompt("What is it?", history=[("Locate all <p>cat</p> in this image.", "<sep>Two cats<sep>")])
    outputs = processor(
        images=[red_image, red_image],
        text=[f"{marked} <sep>A dog<sep></s>", "What is it?"],
        answers=[None, "A red ball"],
    )
    supervised = [row[row != -100].tolist() for row in outputs["labels"]]
    assert supervised[0] == tokenizer("two cats </s> a dog </s>", add_special_tokens=False)["input_ids"]
    assert supervised[1] == tokenizer("a red ball </s>", add_special_tokens=False)["input_ids"]
    with pytest.raises(TypeError, match="answers"):
        processor(images=[red_image, red_image], text=["What is it?"] * 2, answers=["A dog", 3])


def test_ground_boxes_and_placeholders(processor, tokenizer, red_image):
    outputs = processor(
        images=red_image, text=rec_prompt("the dog"), answers=rec_answer(), ground_boxes=[[[50, 25, 150, 75]]]
    )
    torch.testing.assert_close(outputs["ground_boxes"], torch.tensor([[[0.25, 0.25, 0.75, 0.75]]]))
    assert outputs["ground_boxes_mask"].tolist() == [[True]]
    ground = token_id(tokenizer, "<ground_box>")
    positions = (outputs["input_ids"][0] == ground).nonzero().flatten().tolist()
    assert len(positions) == 1 and outputs["labels"][0, positions[0]] == ground


def test_apply_chat_template_tokenized_with_assistant_mask(processor, tokenizer, red_image):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red ball."}]},
    ]
    outputs = processor.apply_chat_template(
        [messages], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert outputs["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    ids = torch.as_tensor(outputs["input_ids"][0])
    mask = torch.as_tensor(outputs["assistant_masks"][0]).bool()
    assert (ids == token_id(tokenizer, "<image>")).sum() == NUM_IMAGE_TOKENS
    assert ids[mask].tolist() == tokenizer("a red ball . </s>", add_special_tokens=False)["input_ids"]


def test_text_only_call_is_plain_tokenization(processor, tokenizer):
    outputs = processor(text="A red ball.</s>", add_special_tokens=False)
    assert outputs["input_ids"].tolist() == [tokenizer("a red ball . </s>", add_special_tokens=False)["input_ids"]]
    assert set(outputs) == {"input_ids", "attention_mask"}


def test_return_tensors_none_and_np(processor, red_image):
    as_lists = processor(images=red_image, text="What is it?", boxes=None, return_tensors=None)
    as_numpy = processor(images=red_image, text="What is it?", return_tensors="np")
    assert isinstance(as_lists["input_ids"], list) and isinstance(as_numpy["input_ids"], np.ndarray)
    assert as_lists["input_ids"] == as_numpy["input_ids"].tolist()
    assert as_numpy["image_sizes"].dtype == np.int64


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (dict(text=region_caption_prompt(), boxes=[[[10, 10, float("nan"), 50]]]), ValueError, r"`boxes\[0\]\[0\]`"),
        (dict(text=region_caption_prompt(), boxes=[[[50, 10, 20, 50]]]), ValueError, r"`boxes\[0\]\[0\]`.*x2 > x1"),
        (dict(text=region_caption_prompt(), boxes=[[[10, 10, 300, 50]]]), ValueError, r"`boxes\[0\]\[0\]`.*outside"),
        (dict(text="What is it?", boxes=[[[0, 0, 10, 10]] * 9]), ValueError, r"`boxes\[0\]` has 9 boxes"),
        (dict(text="What is it?", boxes=[[[0, 0, 10, 10]]]), ValueError, r"`boxes` has 1 box"),
        (dict(text=region_caption_prompt()), ValueError, r"`boxes` has 0 box"),
        (dict(text=["What is it?", "And this?"]), ValueError, "`text` has 2 samples but `images` has 1"),
        (dict(text="<image> <image> <region>"), ValueError, r"`text\[0\]` must hold exactly one '<image>'"),
        (dict(text="Image: <image>."), ValueError, r"one '<region>'"),
        (dict(text="<img><image></img> <region>"), ValueError, "already contains '<img>'"),
        (dict(text="What is it?", answers=rec_answer(), ground_boxes=None), ValueError, "`ground_boxes` has 0"),
        (dict(text="What is it?", ground_boxes=[[[0, 0, 10, 10]]]), ValueError, "`ground_boxes` has 1"),
        (dict(text="<image> <region> USER: hi", answers="x"), ValueError, "`answers` need prompts ending"),
        (dict(text="What is it?", answers=["a", "b"]), ValueError, "`answers` has 2 entries"),
        (dict(text="What is it?", truncation=True, max_length=20), ValueError, "truncation"),
        (dict(text=5), TypeError, "`text` must be a string"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(processor, red_image, call, error, match):
    with pytest.raises(error, match=match):
        processor(images=red_image, **call)


def test_bad_batch_structure(processor, red_image):
    with pytest.raises(ValueError, match=r"`images\[0\]` holds 2 images"):
        processor(images=[[red_image, red_image]], text="What is it?")
    with pytest.raises(ValueError, match="`boxes` needs `images`"):
        processor(text="What is it?", boxes=[[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="no `images`"):
        processor(text=build_prompt("What is it?"))


# ------------------------------------------------------------------------------------------------------------------
# Post-processing
# ------------------------------------------------------------------------------------------------------------------


def _generated(processor, tokenizer, images, answers):
    prompts = processor(images=images, text=["What is it?"] * len(answers), padding_side="left")["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False, padding=True)["input_ids"]
    return torch.cat([prompts, torch.tensor(answer_ids)], dim=1), prompts.shape[1]


def test_post_process_grounding_maps_slots_to_original_pixels(processor, tokenizer, red_image):
    tall = PIL.Image.new("RGB", (40, 80))
    answers = [
        "<p> a dog </p> <roi> <r2> <r5> </roi> sits near <roi> <r7> </roi> . </s>",
        "<p> two cats </p> <roi> <r1> </roi> and <p> a red ball </p> on grass </s> <pad> <pad>",
    ]
    generated, prompt_length = _generated(processor, tokenizer, [red_image, tall], answers)
    region_boxes = torch.zeros(2, MAX_REGIONS, 4)
    region_boxes[0, 2] = torch.tensor([0.125, 0.25, 0.5, 0.625])
    region_boxes[0, 7] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    region_boxes[1, 1] = torch.tensor([0.25, 0.5, 0.75, 1.0])
    region_mask = torch.zeros(2, MAX_REGIONS, dtype=torch.bool)
    region_mask[0, [0, 1, 2, 3, 4, 6, 7]] = True  # slot 5 is empty: dropped
    region_mask[1, :2] = True
    image_sizes = [[100, 200], [80, 40]]

    expected = [
        [
            {"phrase": "a dog", "boxes": [[25.0, 25.0, 100.0, 62.5]], "region_indices": [2]},
            {"phrase": None, "boxes": [[0.0, 0.0, 200.0, 100.0]], "region_indices": [7]},
        ],
        [{"phrase": "two cats", "boxes": [[10.0, 40.0, 30.0, 80.0]], "region_indices": [1]}],
    ]
    results = processor.post_process_grounding(generated, region_boxes, region_mask, image_sizes)
    assert results == expected
    by_length = processor.post_process_grounding(generated, region_boxes, region_mask, image_sizes, prompt_length)
    assert by_length == expected
    answers_only = processor.post_process_grounding(
        generated[:, prompt_length:], region_boxes, region_mask, image_sizes
    )
    assert answers_only == expected

    assert processor.post_process_rec(generated, region_boxes, region_mask, image_sizes) == [
        [25.0, 25.0, 100.0, 62.5],
        [10.0, 40.0, 30.0, 80.0],
    ]
    empty = torch.zeros_like(region_mask)
    assert processor.post_process_rec(generated, region_boxes, empty, image_sizes) == [None, None]

    texts = processor.post_process_image_text_to_text(generated, skip_prompt=True)
    assert texts == ["a dog sits near .", "two cats and a red ball on grass"]

    with pytest.raises(ValueError, match="`region_boxes` must have shape"):
        processor.post_process_grounding(generated, region_boxes[0], region_mask, image_sizes)
    with pytest.raises(ValueError, match="`region_mask` must have shape"):
        processor.post_process_grounding(generated, region_boxes, region_mask[:, :3], image_sizes)


# ------------------------------------------------------------------------------------------------------------------
# Hub round trip
# ------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_auto_processor_round_trip(processor, red_image, tmp_path):
    # `import hf_regionmm` (run by the imports above) registers Groma with the Auto classes.
    from hf_regionmm.modeling.configuration_groma import GromaConfig

    assert CONFIG_MAPPING["groma"] is GromaConfig

    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is GromaProcessor and type(reloaded.image_processor) is GromaImageProcessor
    assert (reloaded.num_image_tokens, reloaded.max_region_num) == (NUM_IMAGE_TOKENS, MAX_REGIONS)
    assert reloaded.chat_template == processor.chat_template

    call = dict(
        images=[red_image, PIL.Image.new("L", (30, 60), 128)],
        text=[region_caption_prompt(), rec_prompt("the dog")],
        boxes=[[[20, 10, 120, 60]], []],
        answers=["A red ball.", rec_answer()],
        ground_boxes=[[], [[0, 0, 15, 30]]],
    )
    before, after = processor(**call), reloaded(**call)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
