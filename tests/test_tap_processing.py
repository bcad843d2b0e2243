"""TAP-v2 processing: prompts into the model frame, masks back to the image, captions, concepts, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from hf_regionmm.processing.processing_tap import TapProcessor
from hf_regionmm.systems.tap import tiny_tap_processor


@pytest.fixture(scope="module")
def processor() -> TapProcessor:
    return tiny_tap_processor()


def _image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8))


def test_prompts_map_into_the_padded_model_frame(processor: TapProcessor):
    # 100 x 50 (w x h) -> longest side 64: the resized image is 64 x 32, a scale of 0.64 on both axes.
    inputs = processor(
        images=[_image(100, 50)],
        points=[[[[50.0, 25.0]], [[10.0, 5.0], [90.0, 45.0]]]],
        labels=[[[1], [1, 0]]],
        boxes=[[[10.0, 20.0, 60.0, 40.0]]],
        sketches=[[[[0.0, 0.0], [25.0, 25.0], [50.0, 50.0]]]],
    )
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert inputs["original_sizes"].tolist() == [[50, 100]] and inputs["reshaped_input_sizes"].tolist() == [[32, 64]]
    points, labels = inputs["input_points"], inputs["input_labels"]
    assert points.shape == (1, 4, 3, 2) and labels.shape == (1, 4, 3)
    # Order: points, then boxes, then sketches; padding label 4.
    assert labels[0].tolist() == [[1, 4, 4], [1, 0, 4], [2, 3, 4], [1, 1, 1]]
    torch.testing.assert_close(points[0, 0, 0], torch.tensor([32.0, 16.0]))
    torch.testing.assert_close(points[0, 1, :2], torch.tensor([[6.4, 3.2], [57.6, 28.8]]))
    torch.testing.assert_close(points[0, 2, :2], torch.tensor([[6.4, 12.8], [38.4, 25.6]]))
    torch.testing.assert_close(points[0, 3], torch.tensor([[0.0, 0.0], [16.0, 16.0], [32.0, 32.0]]))
    # Pixels below the resized image are padding (0 after normalization).
    assert inputs["pixel_values"][0, :, 32:].abs().max() == 0
    assert inputs["pixel_values"][0, :, :32].abs().min() > 0


def test_batches_pad_prompts_per_image(processor: TapProcessor):
    inputs = processor(images=[_image(64, 64), _image(80, 40)], points=[[[[5.0, 5.0]], [[6.0, 6.0]]], [[[1.0, 2.0]]]])
    assert inputs["input_labels"].tolist() == [[[1], [1]], [[1], [4]]]  # image 1's second prompt is padding


def test_masks_round_trip_through_the_model_frame(processor: TapProcessor):
    height, width = 48, 96
    mask = np.zeros((height, width), dtype=bool)
    mask[8:40, 20:70] = True
    inputs = processor(images=[_image(width, height)], boxes=[[[20.0, 8.0, 70.0, 40.0]]], masks=[mask[None]])
    mask_labels = inputs["mask_labels"]
    assert mask_labels.shape == (1, 1, 32, 32)
    assert mask_labels[0, 0, 16:].sum() == 0  # the padded rows of the mask frame stay empty
    logits = (mask_labels * 2 - 1).mul(10.0)[:, :, None]  # as if the model predicted the target exactly
    restored = processor.post_process_masks(logits, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert len(restored) == 1 and restored[0].shape == (1, 1, height, width) and restored[0].dtype == torch.bool
    restored_mask = restored[0][0, 0].numpy()
    iou = (restored_mask & mask).sum() / (restored_mask | mask).sum()
    # A 3x coarser mask frame (16 x 32 cells for 48 x 96 pixels) costs at most about a cell at each edge.
    assert iou > 0.85
    assert abs(int(restored_mask.sum()) - int(mask.sum())) < 0.15 * mask.sum()


def test_concept_targets_and_captions_follow_prompt_order(processor: TapProcessor):
    targets = [np.eye(3, dtype=np.float32)[[2, 0]]]
    inputs = processor(
        images=[_image(64, 64)],
        points=[[[[5.0, 5.0]], [[9.0, 9.0]]]],
        concept_targets=targets,
        captions=[["a red circle", None]],
    )
    torch.testing.assert_close(inputs["concept_targets"][0], torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    tokenizer = processor.tokenizer
    words = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    ids = inputs["caption_ids"][0]
    assert ids[0].tolist() == [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    assert (ids[1] == tokenizer.pad_token_id).all()  # no caption for prompt 1


def test_captions_are_truncated_to_max_caption_length(processor: TapProcessor):
    long_caption = " ".join(["red"] * 40)
    inputs = processor(images=[_image(64, 64)], points=[[[[5.0, 5.0]]]], captions=[[long_caption]])
    ids = inputs["caption_ids"][0, 0]
    assert ids.shape == (processor.max_caption_length,) and ids[-1] == processor.tokenizer.eos_token_id


def test_post_process_captions_and_concepts(processor: TapProcessor):
    tokenizer = processor.tokenizer
    words = tokenizer("a small blue square", add_special_tokens=False)["input_ids"]
    row = [*words, tokenizer.eos_token_id, tokenizer.pad_token_id]
    other = tokenizer("a star", add_special_tokens=False)["input_ids"]
    other_row = [*other, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (len(row) - len(other) - 1)
    texts = processor.post_process_captions(torch.tensor([[row, other_row]]))
    assert texts == [["a small blue square", "a star"]]
    logits = torch.tensor([[[0.0, 3.0, 1.0]]])
    concepts = processor.post_process_concepts(logits, ["cat", "dog", "car"], top_k=2)
    probabilities = torch.softmax(logits[0, 0], dim=-1)
    assert [c["concept"] for c in concepts[0][0]] == ["dog", "car"]
    assert concepts[0][0][0]["score"] == pytest.approx(float(probabilities[1]))
    with pytest.raises(ValueError, match="`concept_names` must name every concept"):
        processor.post_process_concepts(logits, ["cat"])


def test_processor_save_and_reload(processor: TapProcessor, tmp_path: Path):
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is TapProcessor and reloaded.max_caption_length == processor.max_caption_length
    assert (
        reloaded.image_processor.size["longest_edge"] == 64
        and reloaded.image_processor.mask_size["longest_edge"] == 32
    )
    kwargs = {"images": [_image(70, 50)], "points": [[[[10.0, 20.0]]]], "captions": [["a red circle"]]}
    first, second = processor(**kwargs), reloaded(**kwargs)
    for key in ("pixel_values", "input_points", "input_labels", "caption_ids"):
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"points": [[[[5.0, 500.0]]]]}, ValueError, r"`points\[0\]\[0\]\[0\]`.*outside"),
        ({"points": [[[[5.0, 5.0]]]], "labels": [[[2]]]}, ValueError, r"`labels\[0\]\[0\]` has labels \[2\]"),
        ({"boxes": [[[30.0, 5.0, 10.0, 20.0]]]}, ValueError, r"`boxes\[0\]\[0\]`.*x2 > x1"),
        ({"sketches": [[[[1.0, 1.0]]]]}, ValueError, r"`sketches\[0\]\[0\]`.*at least 2"),
        ({}, ValueError, r"at least one prompt"),
        ({"points": [[[[5.0, 5.0]]]], "captions": [["a", "b"]]}, ValueError, r"`captions\[0\]` has 2 entries"),
        ({"points": [[[[5.0, 5.0]]]], "concept_targets": [[[0.5, 0.2]]]}, ValueError, r"sum to 1"),
        ({"points": [[[[5.0, 5.0]]]], "masks": [np.zeros((1, 10, 10))]}, ValueError, r"`masks\[0\]` must have shape"),
        ({"points": [[[[5.0, 5.0]]]], "captions": ["a red circle"]}, TypeError, r"`captions\[0\]` must be a list"),
    ],
)
def test_bad_processor_inputs_raise_clear_errors(processor: TapProcessor, kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        processor(images=[_image(64, 64)], **kwargs)


# ---- TAP-v2-Chat -----------------------------------------------------------------------------------------------


def test_chat_prompt_format_by_hand():
    from hf_regionmm.processing.processing_tap import caption_prompt, chat_prompt

    assert chat_prompt("what is red ?") == "USER: <image>\nwhat is red ? ASSISTANT:"
    assert chat_prompt("and blue ?", history=[("what is red ?", "a circle .")]) == (
        "USER: <image>\nwhat is red ? ASSISTANT: a circle . USER: and blue ? ASSISTANT:"
    )
    assert caption_prompt() == "<image>"
    with pytest.raises(ValueError, match="Turn 0"):
        chat_prompt("  ")


def test_chat_processor_expands_image_tokens_and_masks_the_prompt():
    from hf_regionmm.processing.processing_tap import chat_prompt
    from hf_regionmm.systems.tap import tiny_tap_chat_processor

    processor = tiny_tap_chat_processor()
    tokenizer = processor.tokenizer
    prompts = [chat_prompt("what shape is the red object ?"), "<image>"]
    answers = ["a circle .", "an image of a red circle ."]
    inputs = processor(images=[_image(64, 64), _image(50, 80)], text=prompts, answers=answers)
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    assert ((ids == processor.image_token_id).sum(1) == processor.num_image_tokens).all()
    for row in range(2):
        supervised = ids[row][labels[row] != -100].tolist()
        assert supervised == [*tokenizer(answers[row], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        assert ids[row, 0] == tokenizer.bos_token_id and mask[row, 0] == 1  # right padding by default
    left = processor(images=[_image(64, 64), _image(50, 80)], text=prompts, padding_side="left")
    assert "labels" not in left and (left["attention_mask"][:, -1] == 1).all()
    assert left["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    generated = torch.tensor(
        [[*tokenizer("a red star", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 3]]
    )
    assert processor.post_process_image_text_to_text(generated) == ["a red star"]
