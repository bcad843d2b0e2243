"""u-LLaVA image processor and processor: CLIP white padding, SAM branch, prompts, labels, targets, post-processing
(u-LLaVA issue item 3)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, SamImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import hf_regionmm  # noqa: F401  (registers the Auto classes)
from hf_regionmm.processing import processing_ullava
from hf_regionmm.processing.image_processing_ullava import ULlavaImageProcessor, pad_to_square_offsets
from hf_regionmm.processing.processing_ullava import (
    ULLAVA_NEW_TOKENS,
    ULLAVA_SYSTEM_PROMPT,
    ULlavaProcessor,
    build_prompt,
)
from hf_regionmm.systems.ullava import tiny_ullava_processor


@pytest.fixture(scope="module")
def processor() -> ULlavaProcessor:
    return tiny_ullava_processor()


def _solid(height: int, width: int, rgb=(0, 0, 0)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.full((height, width, 3), rgb, dtype=np.uint8))


def _clip_value(pixel: int, channel: int) -> float:
    return (pixel / 255 - OPENAI_CLIP_MEAN[channel]) / OPENAI_CLIP_STD[channel]


# ---- image branches ------------------------------------------------------------------------------------------------


def test_clip_branch_pads_to_a_white_square_then_resizes():
    image_processor = ULlavaImageProcessor(size={"height": 40, "width": 40})
    # 20 rows x 40 columns of black: centred in a 40x40 white square, rows 10..29 are the image.
    outputs = image_processor(_solid(20, 40), return_tensors="pt")
    pixels = outputs["pixel_values"][0]
    assert pixels.shape == (3, 40, 40) and outputs["image_sizes"].tolist() == [[20, 40]]
    for channel in range(3):
        assert pixels[channel, :8].allclose(torch.tensor(_clip_value(255, channel)), atol=1e-4)
        assert pixels[channel, 12:28].allclose(torch.tensor(_clip_value(0, channel)), atol=1e-4)
        assert pixels[channel, 32:].allclose(torch.tensor(_clip_value(255, channel)), atol=1e-4)
    assert pad_to_square_offsets(20, 40) == (0, 10) and pad_to_square_offsets(41, 20) == (10, 0)


def test_sam_branch_resizes_the_longest_side_and_pads(processor):
    inputs = processor(images=[_solid(32, 128, (255, 255, 255))], text=["what is it?"], return_tensors="pt")
    sam = inputs["sam_pixel_values"][0]
    assert sam.shape == (3, 64, 64)
    # 32x128 -> 16x64 in the top rows; zero padding (after normalization: exactly 0) below.
    assert bool((sam[:, 16:] == 0).all()) and bool((sam[:, :16] > 2.0).all())
    assert inputs["image_sizes"].tolist() == [[32, 128]]


def test_grey_rgba_and_arrays_are_converted_to_rgb(processor):
    grey = PIL.Image.fromarray(np.full((30, 30), 90, dtype=np.uint8), mode="L")
    rgb = _solid(30, 30, (90, 90, 90))
    transparent = PIL.Image.fromarray(np.zeros((30, 30, 4), dtype=np.uint8), mode="RGBA")
    white = _solid(30, 30, (255, 255, 255))
    channels_first = torch.full((3, 30, 30), 90, dtype=torch.uint8)
    batch = processor(
        images=[grey, rgb, transparent, white, channels_first],
        text=["what is it?"] * 5,
        return_tensors="pt",
    )
    pixels = batch["pixel_values"]
    torch.testing.assert_close(pixels[0], pixels[1])
    torch.testing.assert_close(pixels[2], pixels[3])
    torch.testing.assert_close(pixels[4], pixels[1])
    torch.testing.assert_close(batch["sam_pixel_values"][0], batch["sam_pixel_values"][1])


# ---- text ----------------------------------------------------------------------------------------------------------


def test_build_prompt_is_the_released_conversation():
    assert build_prompt("find the dog") == f"{ULLAVA_SYSTEM_PROMPT} USER: <image>\nfind the dog ASSISTANT:"
    two_turns = build_prompt("and the cat?", history=[("find the dog", "Sure.")], visual="<video>")
    assert two_turns == (
        f"{ULLAVA_SYSTEM_PROMPT} USER: <video>\nfind the dog ASSISTANT: Sure.</s>USER: and the cat? ASSISTANT:"
    )
    assert build_prompt("hello", visual=None) == f"{ULLAVA_SYSTEM_PROMPT} USER: hello ASSISTANT:"


def test_task_templates_and_answers(processor):
    assert processor.res_prompt("red circle") == "Can you segment and locate the red circle in this image?"
    assert processor.semantic_prompt("circle") == "Can you segment and locate the circle in this image?"
    assert processor.rec_prompt("red circle") == "Please locate the red circle in this image."
    assert processor.salient_prompt() == "Find the salient object in the image."
    assert processor.video_caption_prompt() in processing_ullava.VIDEO_CAPTION_INSTRUCTIONS
    assert processor.res_prompt("red circle", seed=3) in [
        t.format("red circle") for t in processing_ullava.RES_INSTRUCTIONS
    ]
    assert processor.res_answer("red circle") == "Sure. Mask: [SEG]; Location: [LOC]; [tag]red circle[/tag]."
    assert processor.semantic_answer("circle") == "Sure. Info: [SEG]; Location: [LOC]; [tag]circle[/tag]."
    assert processor.rec_answer("red circle") == "Sure. Location: [LOC]; [tag]red circle[/tag]."
    assert processor.salient_answer("red circle", "it is big.") == (
        "Sure. Mask: [SEG]; Location: [LOC]; [tag]red circle[/tag]. Explanation: it is big."
    )
    with pytest.raises(ValueError, match="`expression`"):
        processor.res_prompt("  ")


def test_chat_template_matches_build_prompt(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "find the dog"}]},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "and the cat?"},
    ]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == build_prompt("and the cat?", history=[("find the dog", "Sure.")])


def test_image_tokens_expand_and_labels_cover_the_answer(processor):
    answer = processing_ullava.res_answer("red circle")
    inputs = processor(images=[_solid(40, 50)], text=["find the red circle"], answers=[answer], return_tensors="pt")
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    tokenizer = processor.tokenizer
    patch_id, start_id, end_id = tokenizer.convert_tokens_to_ids(["<image_patch>", "<img_beg>", "</img_end>"])
    assert int((ids == patch_id).sum()) == processor.num_image_tokens
    positions = (ids == patch_id).nonzero().squeeze(1)
    assert int(ids[positions[0] - 1]) == start_id and int(ids[positions[-1] + 1]) == end_id
    supervised = ids[labels != -100]
    assert tokenizer.decode(supervised) == "sure . mask : [SEG] ; location : [LOC] ; [tag] red circle [/tag] . </s>"
    # Labels are the ids on the answer, -100 before it.
    first = int((labels != -100).nonzero()[0, 0])
    assert bool((labels[:first] == -100).all()) and torch.equal(labels[first:], ids[first:])
    assert tokenizer.decode(ids[first - 2 : first]) == "assistant :"


def test_video_frames_are_sampled_uniformly(processor):
    frames = [_solid(32, 32, (25 * index, 0, 0)) for index in range(10)]
    inputs = processor(videos=[frames], text=["describe the video"], return_tensors="pt")
    video = inputs["pixel_values_videos"]
    assert video.shape == (1, processor.num_video_frames, 3, 56, 56)
    # 4 of 10 frames: indices round(linspace(0, 9, 4)) = 0, 3, 6, 9.
    red = [video[0, t, 0, 28, 28].item() for t in range(4)]
    torch.testing.assert_close(torch.tensor(red), torch.tensor([_clip_value(25 * i, 0) for i in (0, 3, 6, 9)]))
    video_patch = processor.tokenizer.convert_tokens_to_ids("<video_patch>")
    assert int((inputs["input_ids"] == video_patch).sum()) == processor.num_video_frames + processor.num_image_tokens


def test_mixed_batch_of_image_video_and_text(processor):
    frames = [_solid(32, 32)] * 4
    inputs = processor(
        images=[_solid(20, 30), None, None],
        videos=[None, frames, None],
        text=["what is it?", "describe the video", "hello"],
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape[0] == 1 and inputs["pixel_values_videos"].shape[0] == 1
    patch = processor.tokenizer.convert_tokens_to_ids("<image_patch>")
    assert (inputs["input_ids"] == patch).sum(1).tolist() == [processor.num_image_tokens, 0, 0]


# ---- targets -------------------------------------------------------------------------------------------------------


def test_ground_boxes_go_to_the_padded_square_frame_and_back(processor):
    answer = processing_ullava.rec_answer("blue square")
    inputs = processor(
        images=[_solid(40, 80)],
        text=["where is the blue square?"],
        answers=[answer],
        ground_boxes=[[[10.0, 5.0, 30.0, 25.0]]],
        return_tensors="pt",
    )
    # 40x80 image: square side 80, 20 rows of white on top.
    torch.testing.assert_close(inputs["loc_boxes"], torch.tensor([[[10 / 80, 25 / 80, 30 / 80, 45 / 80]]]))
    assert inputs["loc_boxes_mask"].tolist() == [[True]]
    pixels = processor.post_process_grounding(inputs["loc_boxes"], inputs["image_sizes"])
    assert pixels == [[[10.0, 5.0, 30.0, 25.0]]]
    # Predicted boxes in the white padding are clipped to the image.
    assert processor.post_process_grounding([torch.tensor([[0.0, 0.0, 1.0, 0.1]])], [[40, 80]]) == [
        [[0.0, 0.0, 80.0, 0.0]]
    ]


def test_ground_masks_are_checked_against_seg_tokens_and_sizes(processor):
    answer = processing_ullava.res_answer("red circle")
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:10, 5:20] = True
    inputs = processor(
        images=[_solid(40, 50)], text=["find it"], answers=[answer], ground_masks=[[mask]], return_tensors="pt"
    )
    assert inputs["seg_masks"][0].shape == (1, 40, 50) and float(inputs["seg_masks"][0].sum()) == 75
    with pytest.raises(ValueError, match=r"`ground_masks\[0\]`.*\[SEG\]"):
        processor(images=[_solid(40, 50)], text=["find it"], answers=[answer], ground_masks=[[mask, mask]])
    with pytest.raises(ValueError, match=r"`ground_masks\[0\]`.*original image size"):
        processor(images=[_solid(40, 50)], text=["find it"], answers=[answer], ground_masks=[[mask.T]])
    with pytest.raises(ValueError, match=r"`ground_boxes\[0\]`.*\[LOC\]"):
        processor(
            images=[_solid(40, 50)],
            text=["find it"],
            answers=[answer],
            ground_boxes=[[[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]]],
        )
    with pytest.raises(ValueError, match=r"`images` has 1 entries but `text` has 2"):
        processor(images=[_solid(40, 50)], text=["a", "b"])


# ---- post-processing -----------------------------------------------------------------------------------------------


def test_post_process_segmentation_thresholds_and_resizes(processor):
    logits = torch.tensor([[[1.0, -1.0], [-2.0, 3.0]]])
    (masks, empty) = processor.post_process_segmentation([logits, torch.zeros(0, 5, 5)])
    assert masks.tolist() == [[[True, False], [False, True]]] and empty.shape == (0, 5, 5)
    (resized,) = processor.post_process_segmentation([torch.full((1, 2, 2), 4.0)], image_sizes=[[6, 4]])
    assert resized.shape == (1, 6, 4) and bool(resized.all())


def test_post_process_tags_and_text(processor):
    answer = "Sure. Mask: [SEG]; Location: [LOC]; [tag]red  circle[/tag]. and [tag]blue square[/tag]"
    assert processor.post_process_tags([answer]) == [["red circle", "blue square"]]
    ids = processor.tokenizer(f"USER: find it ASSISTANT: {answer}</s>")["input_ids"]
    assert processor.post_process_tags(torch.tensor([ids])) == [["red circle", "blue square"]]
    clean = processor.post_process_image_text_to_text(torch.tensor([ids]), skip_prompt=True)
    assert clean == ["sure . mask : ; location : ; red circle . and blue square"]


# ---- round trip --------------------------------------------------------------------------------------------------


def test_processor_round_trips_through_auto_classes(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is ULlavaProcessor
    assert type(reloaded.image_processor) is ULlavaImageProcessor
    assert type(reloaded.sam_image_processor) is SamImageProcessor
    assert (reloaded.num_image_tokens, reloaded.num_video_frames) == (processor.num_image_tokens, 4)
    assert reloaded.sam_image_processor.size.longest_edge == 64
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is ULlavaImageProcessor
    image = _solid(30, 45, (10, 200, 30))
    answer = processing_ullava.rec_answer("green circle")
    kwargs = {"images": [image], "text": ["where?"], "answers": [answer], "ground_boxes": [[[1.0, 2.0, 9.0, 20.0]]]}
    original, again = processor(**kwargs), reloaded(**kwargs)
    assert original.keys() == again.keys()
    for key, value in original.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key


def test_tokenizer_must_end_with_the_new_tokens(processor):
    from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer

    shuffled = build_word_tokenizer(["a", "b"], extra_special_tokens=list(reversed(ULLAVA_NEW_TOKENS)))
    with pytest.raises(ValueError, match="`tokenizer`.*released order"):
        ULlavaProcessor(processor.image_processor, processor.sam_image_processor, shuffled)
