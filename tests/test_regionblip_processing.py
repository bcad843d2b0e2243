"""RegionBLIP processor: image / image-region / point-cloud / point-cloud-region inputs, expectations by hand."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor

import hf_regionmm  # noqa: F401  (registers the Auto classes)
from hf_regionmm.processing.point_cloud_processing import CORNER_SIGNS, box_3d_corners
from hf_regionmm.processing.processing_regionblip import RegionBlipProcessor
from hf_regionmm.systems.regionblip import TINY_NUM_POINTS, tiny_regionblip_config, tiny_regionblip_processor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def processor() -> RegionBlipProcessor:
    return tiny_regionblip_processor()


def _cloud(count: int = 200, seed: int = 0, offset=(0.0, 0.0, 0.0), scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 3)) * scale + np.asarray(offset)


def test_image_is_resized_bicubic_and_clip_normalized(processor):
    image = PIL.Image.new("RGB", (100, 60), (200, 100, 50))
    inputs = processor(images=[image])
    size = tiny_regionblip_config().vision_config.image_size
    assert inputs["pixel_values"].shape == (1, 3, size, size)
    for channel, value in enumerate((200, 100, 50)):
        expected = (value / 255 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        torch.testing.assert_close(
            inputs["pixel_values"][0, channel], torch.full((size, size), expected), atol=1e-4, rtol=0
        )
    assert inputs["image_sizes"].tolist() == [[60, 100]]
    assert "region_boxes" not in inputs and "point_clouds" not in inputs


def test_region_box_is_truncated_then_normalized(processor):
    image = PIL.Image.new("RGB", (100, 200))
    inputs = processor(images=[image], boxes=[[[10.7, 20.2, 50.9, 60.5]]])
    torch.testing.assert_close(inputs["region_boxes"], torch.tensor([[0.10, 0.10, 0.50, 0.30]]))


def test_prompt_layout_and_labels(processor):
    image = PIL.Image.new("RGB", (64, 64))
    num_queries = processor.num_query_tokens
    inputs = processor(images=[image, image], text=["a photo of", ""], captions=["red circle", "a large blue square"])
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    tokenizer = processor.tokenizer
    assert (ids[:, :num_queries] == processor.image_token_id).all()
    assert (labels[:, :num_queries] == -100).all()
    # Sample 0: placeholders, <s>, "a photo of", then the caption and </s> (supervised); sample 1 is longer.
    prompt = tokenizer("a photo of")["input_ids"]
    caption = tokenizer("red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected_ids = [processor.image_token_id] * num_queries + prompt + caption
    length = len(expected_ids)
    assert ids[0, :length].tolist() == expected_ids
    assert labels[0, :length].tolist() == [-100] * (num_queries + len(prompt)) + caption
    assert mask[0].tolist() == [1] * length + [0] * (ids.shape[1] - length)
    assert (labels[0, length:] == -100).all()
    left = processor(images=[image, image], text=["a photo of", ""], padding_side="left")
    assert left["attention_mask"][1, 0] == 0 and left["input_ids"][1, -1] == tokenizer.bos_token_id


def test_object_point_cloud_is_sampled_centred_and_scaled(processor):
    cloud = _cloud(500, offset=(5.0, -2.0, 1.0), scale=3.0)
    points = processor(point_clouds=[cloud, cloud])["point_clouds"]
    assert points.shape == (2, TINY_NUM_POINTS, 3)
    torch.testing.assert_close(points[0].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert abs(float(points[0].norm(dim=1).max()) - 1.0) < 1e-5
    # Sample i is seeded by (seed, i): the two copies get different FPS starts.
    assert not torch.equal(points[0], points[1])
    # Colour columns are dropped; the xyz sample is identical.
    coloured = processor(point_clouds=[np.concatenate([cloud, np.ones((500, 3))], axis=1)])["point_clouds"]
    torch.testing.assert_close(coloured[0], points[0])
    # FPS keeps only points of the input cloud (up to the normalization).
    raw = processor(point_clouds=[cloud], normalize_point_clouds=False)["point_clouds"][0].double()
    distances = torch.cdist(raw, torch.from_numpy(cloud)).min(dim=1).values
    assert float(distances.max()) < 1e-5


def test_point_sampling_and_augmentation_are_seeded(processor):
    cloud = _cloud(300)
    first = processor(point_clouds=[cloud], augment=True, seed=4)["point_clouds"]
    again = processor(point_clouds=[cloud], augment=True, seed=4)["point_clouds"]
    other = processor(point_clouds=[cloud], augment=True, seed=5)["point_clouds"]
    plain = processor(point_clouds=[cloud], seed=4)["point_clouds"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, plain)


def test_3d_box_corners_follow_the_released_order_and_extent_swap():
    corners = box_3d_corners([1.0, 2.0, 3.0, 2.0, 4.0, 6.0])
    # Released: half extents (sx, sz, sy) / 2 = (1, 3, 2).
    np.testing.assert_allclose(corners, np.array([1.0, 2.0, 3.0]) + CORNER_SIGNS * np.array([1.0, 3.0, 2.0]))
    np.testing.assert_allclose(corners[0], [2.0, 5.0, 5.0])
    np.testing.assert_allclose(corners[6], [0.0, -1.0, 1.0])
    exact = box_3d_corners([1.0, 2.0, 3.0, 2.0, 4.0, 6.0], convention="exact")
    np.testing.assert_allclose(exact[0], [2.0, 4.0, 6.0])
    np.testing.assert_allclose(box_3d_corners(corners.reshape(24)), corners)


def test_scene_boxes_follow_their_cloud(processor):
    cloud = _cloud(400, offset=(3.0, 1.0, 0.5), scale=2.0)
    box = [3.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    scene = processor(point_clouds=[cloud], boxes_3d=[box])
    # Scenes stay in scene units by default (released): the corners are the plain corners.
    expected = torch.from_numpy(box_3d_corners(box).reshape(24).astype(np.float32))
    torch.testing.assert_close(scene["region_boxes_3d"][0], expected)
    # Normalized + augmented: the box centre still maps to where the transform sends the cloud's own points.
    moved = processor(point_clouds=[cloud], boxes_3d=[box], normalize_point_clouds=True, augment=True, seed=1)
    corners = moved["region_boxes_3d"][0].reshape(8, 3)
    raw = processor(point_clouds=[cloud], boxes_3d=[box], seed=1)["point_clouds"][0]
    points = moved["point_clouds"][0]
    # The transform is affine: fit it on the points, apply it to the raw corners, compare.
    design = torch.cat([raw, torch.ones(raw.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, points.double()).solution
    predicted = torch.cat([expected.reshape(8, 3), torch.ones(8, 1)], dim=1).double() @ solution
    torch.testing.assert_close(corners.double(), predicted, atol=1e-4, rtol=0)


def test_bad_inputs_name_the_argument_and_the_fix(processor):
    image = PIL.Image.new("RGB", (80, 60))
    cloud = _cloud(200)
    with pytest.raises(ValueError, match="either `images` or `point_clouds`"):
        processor(images=[image], point_clouds=[cloud])
    with pytest.raises(ValueError, match=r"`boxes\[0\]`.*1 region slots"):
        processor(images=[image], boxes=[[[1, 1, 10, 10], [2, 2, 20, 20]]])
    with pytest.raises(ValueError, match=r"`boxes\[0\]` is empty"):
        processor(images=[image], boxes=[[]])
    with pytest.raises(ValueError, match=r"looks normalized"):
        processor(images=[image], boxes=[[[0.1, 0.1, 0.5, 0.5]]])
    with pytest.raises(ValueError, match=r"`point_clouds\[0\]` has 10 points.*num_points"):
        processor(point_clouds=[_cloud(10)])
    with pytest.raises(ValueError, match=r"`boxes_3d\[0\]`.*6 numbers"):
        processor(point_clouds=[cloud], boxes_3d=[[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"`boxes_3d` has 2 entries"):
        processor(point_clouds=[cloud], boxes_3d=[[0, 0, 0, 1, 1, 1]] * 2)
    with pytest.raises(ValueError, match=r"`boxes` are image regions"):
        processor(point_clouds=[cloud], boxes=[[[1, 1, 5, 5]]])
    with pytest.raises(ValueError, match=r"`text` has 2 entries"):
        processor(images=[image], text=["a", "b"])
    with pytest.raises(ValueError, match=r"must not contain '<image>'"):
        processor(images=[image], text=["<image> a"])
    with pytest.raises(ValueError, match=r"`point_sampling`"):
        RegionBlipProcessor(processor.image_processor, processor.tokenizer, point_sampling="grid")


def test_save_and_reload_through_auto_processor(processor, tmp_path):
    special = RegionBlipProcessor(
        processor.image_processor, processor.tokenizer, num_query_tokens=4, num_points=48, point_sampling="random"
    )
    special.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is RegionBlipProcessor
    assert (reloaded.num_points, reloaded.point_sampling, reloaded.box_3d_convention) == (48, "random", "released")
    cloud = _cloud(100)
    torch.testing.assert_close(
        reloaded(point_clouds=[cloud], captions=["a cube"])["point_clouds"],
        special(point_clouds=[cloud], captions=["a cube"])["point_clouds"],
    )


def test_post_process_captions_drops_prompt_and_special_tokens(processor):
    tokenizer = processor.tokenizer
    prompt = [processor.image_token_id] * processor.num_query_tokens + [tokenizer.bos_token_id]
    caption = tokenizer("red circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    generated = torch.tensor([prompt + caption])
    assert processor.post_process_captions(generated, prompt_length=len(prompt)) == ["red circle"]
