"""Groma evaluation (REC acc@0.5, AS-MANY AR, region-caption CIDEr-D) and the Groma part of `hf-regionmm demo`.

The metric plumbing is tested with an oracle: the proposer is replaced by the scenes' own boxes in a known, permuted
slot order, and `generate` by a function that answers each prompt with the `<rK>` tokens (or caption) a perfect, a
wrong or a half-right model would write. Expected scores are then computed by hand. The demo runs in its quick mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

from hf_regionmm import cli
from hf_regionmm.evaluation import load_metric
from hf_regionmm.evaluation.groma_eval import (
    GROMA_EVAL_TASKS,
    evaluate_groma,
    evaluate_groma_checkpoint,
    generate_groma_answers,
    groma_eval_scenes,
    rec_accuracy_by_kind,
)
from hf_regionmm.modeling.box_ops import box_xyxy_to_cxcywh
from hf_regionmm.modeling.detr_proposer import DetrProposerOutput
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration
from hf_regionmm.registry import get_system
from hf_regionmm.systems.groma import tiny_groma_config, tiny_groma_processor
from hf_regionmm.systems.groma_demo import QUICK_RECIPE, groma_demo, init_for_training_from_scratch

# Two hand-made scenes on non-square images (so a mix-up of width and height would show), objects far apart (so a
# wrong box has IoU 0 with the right one). Boxes are absolute pixel xyxy of the original image.
SCENES_SPEC = [
    {
        "size": (120, 90),
        "objects": [
            ("square", "red", "small", [10.0, 10.0, 40.0, 40.0]),
            ("circle", "blue", "medium", [60.0, 30.0, 100.0, 70.0]),
            ("circle", "red", "small", [15.0, 55.0, 45.0, 85.0]),
        ],
        # slot k holds object SLOT_ORDER[k]: deliberately not the object order.
        "slot_order": [2, 0, 1],
    },
    {
        "size": (90, 130),
        "objects": [
            ("star", "green", "large", [5.0, 5.0, 50.0, 45.0]),
            ("star", "yellow", "large", [40.0, 80.0, 85.0, 125.0]),
        ],
        "slot_order": [1, 0],
    },
]
# What `evaluate_groma` returns per task.
REC_METRICS = {
    "rec_acc@0.5",
    "rec_miou",
    "rec_no_box_rate",
    "rec_first_region_acc@0.5",
    "rec_best_region_acc@0.5",
}
GROUNDING_METRICS = {"ar", "ar50", "ar75"}
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (240, 210, 40)}


def _scenes() -> list[dict]:
    scenes = []
    for spec in SCENES_SPEC:
        image = Image.new("RGB", spec["size"], (235, 235, 235))
        draw = ImageDraw.Draw(image)
        for _, color, _, box in spec["objects"]:
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLORS[color])
        scenes.append(
            {
                "image": image,
                "boxes": [box for *_, box in spec["objects"]],
                "categories": [shape for shape, *_ in spec["objects"]],
                "referring_expressions": [
                    {"text": f"the {color} {shape}", "object_index": index, "kind": "attribute"}
                    for index, (shape, color, _, _) in enumerate(spec["objects"])
                ],
                "region_captions": [f"a {size} {color} {shape}" for shape, color, size, _ in spec["objects"]],
            }
        )
    return scenes


class Oracle:
    """Patch a tiny Groma so that its regions are the scenes' boxes and `generate` answers like a chosen model.

    `mode`: "right" (every answer correct), "wrong" (REC names another object, grounding names no box, captions
    describe another object), or "half" (REC wrong on the second scene; grounding drops every second instance).
    """

    def __init__(self, model: GromaForConditionalGeneration, processor, scenes: list[dict], mode: str) -> None:
        self.model, self.processor, self.scenes, self.mode = model, processor, scenes, mode
        self.tokenizer = processor.tokenizer
        with torch.no_grad():
            pixels = processor.image_processor([scene["image"] for scene in scenes], return_tensors="pt")
            self.fingerprints = model.model.encode_image(pixels["pixel_values"])[0]
        model.model.propose_regions = self.propose
        model.generate = self.generate

    def scene_of(self, first_vision_map: torch.Tensor) -> int:
        distances = (self.fingerprints - first_vision_map).flatten(1).abs().amax(1)
        return int(distances.argmin())

    def propose(self, vision_maps, detection_targets=None) -> DetrProposerOutput:
        boxes = torch.zeros(vision_maps[0].shape[0], 4, 4)
        scores = torch.zeros(vision_maps[0].shape[0], 4)
        for row in range(vision_maps[0].shape[0]):
            index = self.scene_of(vision_maps[0][row])
            scene, spec = self.scenes[index], SCENES_SPEC[index]
            width, height = spec["size"]
            scale = torch.tensor([width, height, width, height])
            for slot, obj in enumerate(spec["slot_order"]):
                boxes[row, slot] = box_xyxy_to_cxcywh(torch.tensor(scene["boxes"][obj]) / scale)
                scores[row, slot] = 0.9 - 0.1 * slot
            # Padding proposals below the score threshold never take a slot.
            boxes[row, len(spec["slot_order"]) :] = torch.tensor([0.5, 0.5, 0.1, 0.1])
        return DetrProposerOutput(pred_boxes=boxes, scores=scores)

    def answer(self, index: int, prompt: str, refer_box: torch.Tensor | None) -> str:
        scene, spec = self.scenes[index], SCENES_SPEC[index]
        slot_of = {obj: slot for slot, obj in enumerate(spec["slot_order"])}
        query = prompt.split("user :")[-1]
        if "<refer_feat>" in query:
            width, height = spec["size"]
            pixel_box = refer_box * torch.tensor([width, height, width, height])
            obj = min(
                range(len(scene["boxes"])), key=lambda i: (torch.tensor(scene["boxes"][i]) - pixel_box).abs().sum()
            )
            if self.mode == "wrong":
                obj = (obj + 1) % len(scene["boxes"])
            return scene["region_captions"][obj]
        phrase = re.search(r"<p>(.*?)</p>", query).group(1).strip()
        if query.strip().startswith("locate all"):
            category = phrase.removesuffix("s")
            objects = [i for i, name in enumerate(scene["categories"]) if name == category]
            if self.mode == "wrong":
                objects = []
            elif self.mode == "half":
                objects = objects[::2]
            return "<roi>" + "".join(f"<r{slot_of[i]}>" for i in objects) + "</roi>"
        obj = next(e["object_index"] for e in scene["referring_expressions"] if e["text"] == phrase)
        if self.mode == "wrong" or (self.mode == "half" and index == 1):
            obj = (obj + 1) % len(scene["boxes"])
        return f"<roi><r{slot_of[obj]}></roi>"

    def generate(self, input_ids, pixel_values, refer_boxes=None, refer_boxes_mask=None, **kwargs):
        with torch.no_grad():
            first_maps = self.model.model.encode_image(pixel_values)[0]
        rows = []
        for row in range(input_ids.shape[0]):
            prompt = self.tokenizer.decode(input_ids[row], skip_special_tokens=False)
            refer_box = refer_boxes[row, 0] if refer_boxes is not None else None
            answer = self.answer(self.scene_of(first_maps[row]), prompt, refer_box)
            rows.append(self.tokenizer(answer + "</s>", add_special_tokens=False)["input_ids"])
        width = max(len(row) for row in rows)
        padded = [row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype)], dim=1)


@pytest.fixture(scope="module")
def processor():
    return tiny_groma_processor()


def _oracle_model(processor, mode: str) -> GromaForConditionalGeneration:
    torch.manual_seed(0)
    model = GromaForConditionalGeneration(tiny_groma_config()).eval()
    Oracle(model, processor, _scenes(), mode)
    return model


def test_right_oracle_scores_perfectly_in_original_pixels(processor):
    model = _oracle_model(processor, "right")
    predictions: dict = {}
    metrics = evaluate_groma(model, processor, _scenes(), batch_size=2, predictions=predictions)
    assert metrics["rec_acc@0.5"] == 1.0
    assert metrics["rec_no_box_rate"] == 0.0
    assert metrics["rec_miou"] > 0.999
    # Reference points on the same slots: `<r0>` holds object 2 of scene 0 and object 1 of scene 1 (2 of 5
    # expressions); every reference has its own slot.
    assert metrics["rec_first_region_acc@0.5"] == pytest.approx(2 / 5)
    assert metrics["rec_best_region_acc@0.5"] == 1.0
    assert metrics["ar"] == pytest.approx(1.0) and metrics["ar50"] == 1.0 and metrics["ar75"] == 1.0
    references = [caption for scene in _scenes() for caption in scene["region_captions"]]
    perfect = load_metric("cider_d").compute(predictions=references, references=[[c] for c in references])
    assert metrics["region_caption_cider_d"] == pytest.approx(perfect["cider_d"])
    assert metrics["region_caption_cider_d"] > 5.0
    # Boxes come back in pixels of the original (non-square) images.
    for sample in predictions["rec"]:
        assert sample["prediction"] == pytest.approx(sample["reference"], abs=1e-3)
    assert len(predictions["rec"]) == 5 and len(predictions["multi_grounding"]) == 3


def test_wrong_oracle_scores_zero(processor):
    model = _oracle_model(processor, "wrong")
    metrics = evaluate_groma(model, processor, _scenes(), batch_size=3)
    assert metrics["rec_acc@0.5"] == 0.0 and metrics["rec_miou"] == 0.0 and metrics["rec_no_box_rate"] == 0.0
    assert metrics["ar"] == 0.0 and metrics["ar50"] == 0.0
    # The reference points depend on the regions only, not on the answers.
    assert metrics["rec_first_region_acc@0.5"] == pytest.approx(2 / 5)
    assert metrics["rec_best_region_acc@0.5"] == 1.0
    right = evaluate_groma(_oracle_model(processor, "right"), processor, _scenes(), tasks=("region_caption",))
    assert metrics["region_caption_cider_d"] < right["region_caption_cider_d"]


def test_half_right_oracle_matches_hand_computed_scores(processor):
    model = _oracle_model(processor, "half")
    predictions: dict = {}
    metrics = evaluate_groma(model, processor, _scenes(), tasks=("rec", "multi_grounding"), predictions=predictions)
    # REC: scene 0's three expressions right, scene 1's two wrong.
    assert metrics["rec_acc@0.5"] == pytest.approx(3 / 5)
    assert [sample["kind"] for sample in predictions["rec"]] == ["attribute"] * 5
    assert rec_accuracy_by_kind(predictions["rec"]) == {"attribute": pytest.approx(3 / 5)}
    # Grounding pools recall per category: square 1/1, circle 1/2 (second circle dropped), star 1/2.
    assert metrics["ar"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert set(metrics) == REC_METRICS | GROUNDING_METRICS


def test_no_region_token_counts_as_missing_box(processor):
    model = _oracle_model(processor, "right")
    model.generate = lambda input_ids, **kwargs: torch.cat(
        [input_ids, torch.full((input_ids.shape[0], 1), processor.tokenizer.eos_token_id)], dim=1
    )
    metrics = evaluate_groma(model, processor, _scenes(), tasks=("rec",))
    assert metrics == {
        "rec_acc@0.5": 0.0,
        "rec_miou": 0.0,
        "rec_no_box_rate": 1.0,
        "rec_first_region_acc@0.5": pytest.approx(2 / 5),
        "rec_best_region_acc@0.5": 1.0,
    }


def test_real_generation_on_synthetic_scenes(processor):
    torch.manual_seed(0)
    model = GromaForConditionalGeneration(tiny_groma_config())
    scenes = groma_eval_scenes(2)
    answers = generate_groma_answers(
        model, processor, [scenes[0]["image"]] * 2, ["Locate <p>the star</p> in the image."] * 2, max_new_tokens=3
    )
    assert answers[0].text == answers[1].text  # greedy and batched: identical prompts, identical answers
    assert all(len(box) == 4 for box in answers[0].region_boxes)
    metrics = evaluate_groma(model, processor, scenes, max_new_tokens=3)
    assert set(metrics) == REC_METRICS | GROUNDING_METRICS | {"region_caption_cider_d"}
    assert all(math.isfinite(value) and value >= 0 for value in metrics.values())
    assert model.training  # evaluation restores the mode it found


def test_bad_arguments_are_named(processor):
    model = GromaForConditionalGeneration(tiny_groma_config())
    with pytest.raises(ValueError, match="`tasks`"):
        evaluate_groma(model, processor, _scenes(), tasks=("vqa",))
    with pytest.raises(ValueError, match="`scenes` is empty"):
        evaluate_groma(model, processor, [])
    broken = [{key: value for key, value in _scenes()[0].items() if key != "referring_expressions"}]
    with pytest.raises(ValueError, match=r"`scenes\[0\]` lacks \['referring_expressions'\]"):
        evaluate_groma(model, processor, broken, tasks=("rec",))
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate_groma(model, processor, _scenes(), batch_size=0)
    with pytest.raises(ValueError, match="`queries` has 1 entries for 2 `images`"):
        generate_groma_answers(model, processor, [_scenes()[0]["image"]] * 2, ["Locate <p>x</p> in the image."])
    with pytest.raises(ValueError, match="`checkpoint`"):
        evaluate_groma_checkpoint("/nonexistent/groma", "/tmp/unused")
    assert GROMA_EVAL_TASKS == ("rec", "multi_grounding", "region_caption")


def test_quick_demo_writes_checkpoint_card_pictures_and_reloads(tmp_path: Path):
    spec = get_system("groma")
    assert spec.demo is not None and spec.evaluate is evaluate_groma_checkpoint
    messages: list[str] = []
    metrics = groma_demo(tmp_path, messages.append, quick=True)
    for name in ("rec_acc@0.5", "ar", "rec_miou", "region_caption_cider_d"):
        assert f"{name}_before" in metrics and f"{name}_after" in metrics
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert any("groma det" in m for m in messages) and any("groma instruct" in m for m in messages)

    checkpoint = tmp_path / "checkpoint"
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (checkpoint / name).is_file(), name
    card = (checkpoint / "README.md").read_text()
    assert "model-index" in card and f"| rec_acc@0.5 | {metrics['rec_acc@0.5_after']:.4f} |" in card
    assert "untrained | trained" in card
    pictures = json.loads((tmp_path / "pictures" / "pictures.json").read_text())
    assert len(pictures) == 2
    for entry in pictures:
        assert Image.open(tmp_path / "pictures" / entry["rec_picture"]).size[0] > 0
        assert (tmp_path / "pictures" / entry["grounded_caption_picture"]).is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    assert saved["recipe"]["shuffle_regions_in_training"] is False
    assert 0.0 <= saved["rec_answers_naming_r0"] <= 1.0
    # REC per expression kind, before and after; the card names the trained model's.
    assert set(saved["rec_acc_by_kind"]) == {"before", "after"}
    assert set(saved["rec_acc_by_kind"]["after"]) <= {"attribute", "relation", "ordinal"}
    assert all(0.0 <= value <= 1.0 for value in saved["rec_acc_by_kind"]["after"].values())
    assert "REC acc@0.5 of the trained model by expression kind: " in card
    # The card reads REC against its two reference points on the same regions, with the measured numbers.
    assert f"always answering `<r0>` scores {metrics['rec_first_region_acc@0.5_after']:.3f}" in card
    assert f"always the best-overlapping slot {metrics['rec_best_region_acc@0.5_after']:.3f}" in card
    # Slots may be shuffled in training only: the saved model keeps the deterministic order that `<rK>` answers index.
    saved_config = json.loads((checkpoint / "config.json").read_text())
    assert saved_config["shuffle_regions"] is False
    # The tiny LLM starts at a weight scale for its 64-wide layers, not Llama's 7B-width 0.02; the card says so.
    assert saved_config["text_config"]["initializer_range"] == 0.125
    assert "LLM drawn at initializer_range 0.125" in card

    # The saved checkpoint, loaded through the Auto classes, reproduces the demo's final evaluation.
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert isinstance(model, GromaForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(checkpoint), type(tiny_groma_processor()))
    reloaded = spec.evaluate(str(checkpoint), tmp_path / "eval", num_samples=4)
    assert reloaded == pytest.approx({name: metrics[f"{name}_after"] for name in reloaded})
    assert (tmp_path / "eval" / "groma_predictions.json").is_file()

    assert (
        cli.main(["eval", "groma", str(checkpoint), "--num-samples", "4", "--output-dir", str(tmp_path / "cli")]) == 0
    )
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"] == pytest.approx(reloaded)


def test_demo_recipe_training_the_image_encoder_in_det_says_so_and_trains_it(tmp_path: Path):
    recipe = dataclasses.replace(QUICK_RECIPE, vision_tower_stages=("det",), align_steps=0, instruct_steps=0)
    messages: list[str] = []
    groma_demo(tmp_path, messages.append, recipe=recipe)
    det_message = next(m for m in messages if m.startswith("groma det:"))
    assert "frozen DINOv2" not in det_message and "+ the image encoder" in det_message

    # The same seed rebuilds the untrained model: the saved image encoder differs from it (it trained in `det`).
    set_seed(recipe.seed)
    untrained = GromaForConditionalGeneration(tiny_groma_config(**dict(recipe.config_overrides)))
    init_for_training_from_scratch(untrained)
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint")
    before = untrained.model.vision_tower.state_dict()
    after = trained.model.vision_tower.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)
    # Nothing else of the language side moved: align/instruct did not run.
    assert torch.equal(
        untrained.model.region_encoder.output_proj.weight, trained.model.region_encoder.output_proj.weight
    )


def test_rec_accuracy_by_kind_groups_samples_by_their_expression_kind():
    box = [10.0, 10.0, 50.0, 50.0]
    shifted = [30.0, 30.0, 70.0, 70.0]  # IoU 1/7 with `box`
    samples = [
        {"kind": "relation", "prediction": box, "reference": box},
        {"kind": "attribute", "prediction": box, "reference": box},
        {"kind": "relation", "prediction": shifted, "reference": box},
        {"kind": "attribute", "prediction": None, "reference": box},  # no box named: wrong
        {"kind": "attribute", "prediction": box, "reference": box},
        {"prediction": box, "reference": box},  # data without kinds
    ]
    by_kind = rec_accuracy_by_kind(samples)
    assert list(by_kind) == ["relation", "attribute", "unknown"]
    assert by_kind == {"relation": 0.5, "attribute": pytest.approx(2 / 3), "unknown": 1.0}
    assert rec_accuracy_by_kind([]) == {}
