"""TAP-v2 / TAP-v2-Chat evaluation (mask mIoU, concept accuracy, caption CIDEr-D, VQA) and their demos.

The metric plumbing is tested with oracles: a tiny `TapModel` whose forward answers every prompt with the ground-truth
mask (as logits in the model's mask frame), a one-hot concept and a semantic token that `generate_captions` turns into
the reference caption ("right"), or with another object's mask, concept and caption ("wrong"). The scenes are
non-square, with rectangles on even pixels, so the 2x mask frame round-trips exactly through `post_process_masks`
and a width/height mix-up would show. Both demos run in their quick mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoModelForMaskGeneration, AutoProcessor

from hf_regionmm import cli
from hf_regionmm.data.synthetic import CONCEPT_VOCABULARY, concept_distribution, encode_rle
from hf_regionmm.evaluation.tap_eval import (
    TAP_CHAT_EVAL_TASKS,
    evaluate_tap,
    evaluate_tap_chat,
    evaluate_tap_chat_checkpoint,
    evaluate_tap_checkpoint,
    interior_point,
    tap_eval_scenes,
)
from hf_regionmm.modeling.modeling_tap import TapChatForConditionalGeneration, TapImageSegmentationOutput, TapModel
from hf_regionmm.processing.processing_tap import caption_prompt
from hf_regionmm.registry import get_system
from hf_regionmm.systems.tap import (
    tiny_tap_chat_config,
    tiny_tap_chat_processor,
    tiny_tap_config,
    tiny_tap_processor,
)
from hf_regionmm.systems.tap_demo import tap_chat_demo, tap_demo

# (width, height) and objects (shape, color, size, box) with even pixel edges; objects never overlap.
SCENES_SPEC = [
    {
        "size": (64, 48),
        "objects": [
            ("square", "red", "small", [4, 4, 20, 20]),
            ("circle", "blue", "medium", [30, 6, 58, 30]),
            ("star", "green", "large", [8, 28, 30, 46]),
        ],
    },
    {
        "size": (48, 64),
        "objects": [
            ("triangle", "yellow", "large", [2, 2, 40, 26]),
            ("hexagon", "purple", "small", [10, 36, 24, 60]),
        ],
    },
]
RGB = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40)}
RGB["purple"] = (140, 60, 180)


def _scenes() -> list[dict]:
    scenes = []
    for spec in SCENES_SPEC:
        width, height = spec["size"]
        image = Image.new("RGB", (width, height), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        masks = []
        for _, color, _, (x1, y1, x2, y2) in spec["objects"]:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=RGB[color])
            mask = np.zeros((height, width), dtype=bool)
            mask[y1:y2, x1:x2] = True
            masks.append(mask)
        scenes.append(
            {
                "image": image,
                "width": width,
                "height": height,
                "boxes": [[float(v) for v in box] for *_, box in spec["objects"]],
                "masks": [encode_rle(mask) for mask in masks],
                "categories": [shape for shape, *_ in spec["objects"]],
                "concept_targets": [
                    concept_distribution(shape, color).tolist() for shape, color, *_ in spec["objects"]
                ],
                "region_captions": [f"a {size} {color} {shape}" for shape, color, size, _ in spec["objects"]],
                "image_caption": "an image of " + " and ".join(f"a {c} {s}" for s, c, *_ in spec["objects"]) + " .",
                "vqa": [{"question": "how many shapes are there ?", "answer": str(len(spec["objects"]))}],
            }
        )
    return scenes


class TapOracle:
    """Patch a tiny `TapModel` so that every prompt gets the mask, concept and caption of a chosen object.

    `box_mode` / `point_mode`: "right" answers box (point) prompts with the prompted object, "wrong" with the next
    object of the scene. The semantic token carries `(scene, object)` so `generate_captions` can write its caption.
    """

    def __init__(self, model: TapModel, processor, scenes: list[dict], box_mode: str, point_mode: str) -> None:
        self.model, self.processor, self.scenes = model, processor, scenes
        self.box_mode, self.point_mode = box_mode, point_mode
        self.pixels = processor.image_processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]
        self.mask_frames = [
            processor.image_processor.preprocess_instance_masks(
                np.stack([_mask(scene, k) for k in range(len(scene["boxes"]))]), (scene["height"], scene["width"])
            )
            for scene in scenes
        ]
        model.forward = self.forward
        model.generate_captions = self.generate_captions

    def scene_of(self, pixel_values: torch.Tensor) -> int:
        return int((self.pixels - pixel_values).flatten(1).abs().amax(1).argmin())

    def object_of(self, scene: dict, points: torch.Tensor, labels: torch.Tensor) -> int:
        # The oracle's images are not resized (longest side 64 = the model frame), so model pixels = image pixels.
        if bool((labels == 2).any()):
            box = points[labels != 4][:2].flatten()
            return int((torch.tensor(scene["boxes"]) - box).abs().sum(-1).argmin())
        x, y = (int(v) for v in points[0])
        return next(k for k in range(len(scene["boxes"])) if _mask(scene, k)[y, x])

    def forward(self, pixel_values, input_points, input_labels, **kwargs) -> TapImageSegmentationOutput:
        batch, prompts = input_points.shape[:2]
        num_concepts = len(CONCEPT_VOCABULARY)
        masks = torch.full((batch, prompts, 4, 32, 32), -10.0)
        concept_logits = torch.zeros(batch, prompts, num_concepts)
        tokens = torch.zeros(batch, prompts, self.model.config.embed_dim)
        mask_index = torch.zeros(batch, prompts, dtype=torch.long)
        for b in range(batch):
            index = self.scene_of(pixel_values[b])
            scene = self.scenes[index]
            for p in range(prompts):
                if bool((input_labels[b, p] == 4).all()):
                    continue
                is_box = bool((input_labels[b, p] == 2).any())
                obj = self.object_of(scene, input_points[b, p], input_labels[b, p])
                if (self.box_mode if is_box else self.point_mode) == "wrong":
                    obj = (obj + 1) % len(scene["boxes"])
                route = 0 if is_box else 2
                mask_index[b, p] = route
                masks[b, p, route] = self.mask_frames[index][obj] * 20.0 - 10.0
                shape, color = scene["categories"][obj], SCENES_SPEC[index]["objects"][obj][1]
                concept_logits[b, p, CONCEPT_VOCABULARY.index(f"{color} {shape}")] = 30.0
                tokens[b, p, :2] = torch.tensor([index, obj], dtype=torch.float32)
        return TapImageSegmentationOutput(
            pred_masks=masks,
            iou_scores=torch.full((batch, prompts, 4), 0.9),
            mask_index=mask_index,
            selected_semantic_tokens=tokens,
            concept_logits=concept_logits,
        )

    def generate_captions(self, semantic_tokens: torch.Tensor, max_new_tokens=None) -> torch.Tensor:
        tokenizer = self.processor.tokenizer
        rows = []
        for token in semantic_tokens.reshape(-1, semantic_tokens.shape[-1]):
            scene, obj = int(token[0]), int(token[1])
            caption = self.scenes[scene]["region_captions"][obj]
            rows.append(tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(len(row) for row in rows)
        padded = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.tensor(padded).reshape(*semantic_tokens.shape[:-1], width)


def _mask(scene: dict, index: int) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in scene["boxes"][index])
    mask = np.zeros((scene["height"], scene["width"]), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


@pytest.fixture(scope="module")
def processor():
    return tiny_tap_processor()


def _oracle(processor, box_mode: str, point_mode: str) -> TapModel:
    torch.manual_seed(0)
    model = TapModel(tiny_tap_config()).eval()
    TapOracle(model, processor, _scenes(), box_mode, point_mode)
    return model


def test_right_oracle_scores_perfectly_in_original_pixels(processor):
    predictions: list[dict] = []
    metrics = evaluate_tap(_oracle(processor, "right", "right"), processor, _scenes(), predictions=predictions)
    assert metrics["box_miou"] == pytest.approx(1.0)
    assert metrics["point_miou"] == pytest.approx(1.0)
    assert metrics["miou"] == pytest.approx(1.0)
    assert metrics["concept_acc"] == 1.0 and metrics["concept_exact_acc"] == 1.0
    # CIDEr-D of a caption equal to its (only) reference is 10 on pycocoevalcap's scale.
    assert metrics["cider"] == pytest.approx(10.0, abs=1e-6)
    # These hand-made scenes carry no `colors`, so only the shape word is checked.
    assert metrics["caption_shape_acc"] == 1.0 and "caption_color_acc" not in metrics
    assert len(predictions) == 5
    assert predictions[3]["concept"] == "yellow triangle" and predictions[3]["caption"] == "a large yellow triangle"
    assert all(entry["box_iou"] == pytest.approx(1.0) for entry in predictions)


def test_wrong_oracle_scores_zero(processor):
    metrics = evaluate_tap(_oracle(processor, "wrong", "wrong"), processor, _scenes())
    assert metrics["miou"] == 0.0 and metrics["box_miou"] == 0.0 and metrics["point_miou"] == 0.0
    # Every wrong object is another shape, so the concept names neither the category nor the exact concept.
    assert metrics["concept_acc"] == 0.0 and metrics["concept_exact_acc"] == 0.0
    assert metrics["cider"] < 2.0
    assert metrics["caption_shape_acc"] == 0.0


def test_box_right_click_wrong_pools_the_two_mious(processor):
    metrics = evaluate_tap(_oracle(processor, "right", "wrong"), processor, _scenes())
    assert metrics["box_miou"] == pytest.approx(1.0) and metrics["point_miou"] == 0.0
    assert metrics["miou"] == pytest.approx(0.5)
    # Concepts and captions come from the box prompts.
    assert metrics["concept_acc"] == 1.0 and metrics["cider"] == pytest.approx(10.0, abs=1e-6)


def test_concept_accuracy_counts_category_names():
    from hf_regionmm.evaluation.tap_eval import _names_category

    assert _names_category("red circle", "circle") and _names_category("circle", "circle")
    assert not _names_category("red", "circle") and not _names_category("circle", "ellipse")
    assert not _names_category(None, "circle")


def test_interior_point_lies_in_the_mask():
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:10, 6:20] = True
    x, y = interior_point(mask)
    assert mask[int(y), int(x)] and abs(x - 12.5) <= 1 and abs(y - 6.5) <= 1
    with pytest.raises(ValueError, match="`mask` is empty"):
        interior_point(np.zeros((4, 4), dtype=bool))


def test_bad_arguments_are_named(processor):
    model = TapModel(tiny_tap_config())
    with pytest.raises(TypeError, match="`scenes`"):
        evaluate_tap(model, processor, _scenes()[0])
    with pytest.raises(ValueError, match=r"`scenes\[0\]` lacks \['masks'\]"):
        evaluate_tap(model, processor, [{k: v for k, v in _scenes()[0].items() if k != "masks"}])
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        evaluate_tap(model, processor, _scenes(), max_new_tokens=0)
    model.config.concept_names = None
    with pytest.raises(ValueError, match="`model` has no `concept_names`"):
        evaluate_tap(model, processor, _scenes())
    chat = TapChatForConditionalGeneration(tiny_tap_chat_config())
    with pytest.raises(ValueError, match="`tasks`"):
        evaluate_tap_chat(chat, tiny_tap_chat_processor(), _scenes(), tasks=("grounding",))


def _chat_oracle(processor, scenes: list[dict], right: bool) -> TapChatForConditionalGeneration:
    """Patch `generate` to answer captions and VQA from the scene (right) or with another scene's answer (wrong)."""
    model = TapChatForConditionalGeneration(tiny_tap_chat_config()).eval()
    pixels = processor.image_processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]
    tokenizer = processor.tokenizer

    def generate(input_ids, attention_mask, pixel_values, **kwargs):
        rows = []
        for row in range(input_ids.shape[0]):
            index = int((pixels - pixel_values[row]).flatten(1).abs().amax(1).argmin())
            scene = scenes[index if right else 1 - index]
            prompt = tokenizer.decode(input_ids[row], skip_special_tokens=True)
            answer = scene["vqa"][0]["answer"] if "how many" in prompt else scene["image_caption"]
            rows.append(tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(len(row) for row in rows)
        padded = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)

    model.generate = generate
    return model


def test_tap_chat_oracles():
    processor = tiny_tap_chat_processor()
    scenes = _scenes()
    predictions: dict = {}
    right = evaluate_tap_chat(_chat_oracle(processor, scenes, True), processor, scenes, predictions=predictions)
    assert right["vqa_acc"] == 1.0
    assert right["cider"] > 5.0  # the two captions share most n-grams, so IDF keeps CIDEr-D below 10
    assert predictions["caption"][0]["prediction"] == scenes[0]["image_caption"]
    wrong = evaluate_tap_chat(_chat_oracle(processor, scenes, False), processor, scenes)
    assert wrong["vqa_acc"] == 0.0 and wrong["cider"] < right["cider"] / 2
    assert TAP_CHAT_EVAL_TASKS == ("caption", "vqa")
    assert caption_prompt() == "<image>"


def test_real_untrained_model_on_synthetic_scenes(processor):
    torch.manual_seed(0)
    model = TapModel(tiny_tap_config())
    scenes = tap_eval_scenes(2, seed=3)
    metrics = evaluate_tap(model, processor, scenes)
    assert set(metrics) == {
        "miou",
        "box_miou",
        "point_miou",
        "concept_acc",
        "concept_exact_acc",
        "cider",
        "caption_shape_acc",
        "caption_color_acc",
    }
    assert all(math.isfinite(value) and value >= 0 for value in metrics.values())
    assert 0.0 <= metrics["miou"] <= 1.0 and model.training


def test_quick_demos_write_checkpoint_card_pictures_and_reload(tmp_path: Path):
    spec = get_system("tap")
    assert spec.demo is not None and spec.evaluate is evaluate_tap_checkpoint
    messages: list[str] = []
    metrics = tap_demo(tmp_path / "tap", messages.append, quick=True)
    for name in ("miou", "concept_acc", "cider", "box_miou", "point_miou"):
        assert f"{name}_before" in metrics and f"{name}_after" in metrics
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert any("tap stage1" in m for m in messages) and any("tap stage2" in m for m in messages)
    checkpoint = tmp_path / "tap" / "checkpoint"
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (checkpoint / name).is_file(), name
    card = (checkpoint / "README.md").read_text()
    assert f"| miou | {metrics['miou_after']:.4f} |" in card and "untrained | trained" in card
    pictures = json.loads((tmp_path / "tap" / "pictures" / "pictures.json").read_text())
    assert len(pictures) == 1 and pictures[0]["regions"][0]["concept"] in CONCEPT_VOCABULARY
    assert Image.open(tmp_path / "tap" / "pictures" / pictures[0]["picture"]).size[0] > 0
    # The checkpoint, loaded through the Auto classes, reproduces the demo's final evaluation.
    assert isinstance(AutoModelForMaskGeneration.from_pretrained(checkpoint), TapModel)
    reloaded = spec.evaluate(str(checkpoint), tmp_path / "eval", num_samples=2)
    assert reloaded == pytest.approx({name: metrics[f"{name}_after"] for name in reloaded})
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == pytest.approx(reloaded)
    assert (tmp_path / "eval" / "tap_predictions.json").is_file()

    chat_spec = get_system("tap_chat")
    assert chat_spec.demo is not None and chat_spec.evaluate is evaluate_tap_chat_checkpoint
    chat = tap_chat_demo(tmp_path / "chat", messages.append, quick=True)
    assert {"cider_before", "cider_after", "vqa_acc_before", "vqa_acc_after"} <= set(chat)
    assert any("tap_chat caption" in m for m in messages) and any("tap_chat instruct" in m for m in messages)
    chat_checkpoint = tmp_path / "chat" / "checkpoint"
    assert (chat_checkpoint / "README.md").is_file() and (chat_checkpoint / "model.safetensors").is_file()
    chat_pictures = json.loads((tmp_path / "chat" / "pictures" / "pictures.json").read_text())
    assert (tmp_path / "chat" / "pictures" / chat_pictures[0]["picture"]).is_file()
    assert isinstance(AutoModelForImageTextToText.from_pretrained(chat_checkpoint), TapChatForConditionalGeneration)
    assert type(AutoProcessor.from_pretrained(chat_checkpoint)).__name__ == "TapChatProcessor"
    assert (
        cli.main(["eval", "tap_chat", str(chat_checkpoint), "--num-samples", "2", "--output-dir", str(tmp_path / "c")])
        == 0
    )
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())["metrics"]
    assert saved == pytest.approx({name: chat[f"{name}_after"] for name in saved})
