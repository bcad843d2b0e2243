"""u-LLaVA against its nearest transformers peers (issue 7, item 7; targets in PERFORMANCE.md).

1. One pass producing text + mask + box: `ULlavaForConditionalGeneration.generate` (prefill + N greedy tokens), then
   `predict` on the sequence (the `[SEG]` head: SAM image encoder + mask decoder, masks at the original size; the
   `[LOC]` head: a box), vs transformers' `LlavaForConditionalGeneration.generate` (same CLIP + Llama config, same
   prompt ids) followed by `SamModel` prompted with a box (same SAM config) and `SamImageProcessor.post_process_masks`
   to the original size. A random-weight model rarely emits `[SEG]`/`[LOC]`, so a logits processor makes them the
   last two generated tokens, as in an answer "... Mask: [SEG]; Location: [LOC]"; `predict` reads their states from
   `generate(..., output_hidden_states=True)` instead of running the LLM again. Paper sizes (CLIP-L/14 at
   224 -> 256 tokens, Vicuna-7B, SAM ViT-H at 1024) cannot run on a 2-core CPU: every width is scaled by 1/8 (LLM
   512, CLIP 128, SAM encoder 160, prompt/mask decoder 32), token counts and image sides are kept (256 CLIP tokens,
   64x64 SAM patches), depths kept (quick: 1/4). LLaVA's projector is its own 2-layer MLP, u-LLaVA's the released
   single Linear (a negligible difference at these sizes).
2. Video prefill (8 frames -> 8 temporal + 256 spatial tokens) vs image prefill (256 tokens), same scaled model: the
   CLIP tower runs over 8 frames, the LLM over 8 more positions.
3. The paper-size `ullava-7b` preset on the meta device (< 5 s) vs LLaVA-1.5-style CLIP-L/224 + Vicuna-7B + SAM ViT-H.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessorList,
    SamConfig,
    SamImageProcessor,
    SamModel,
)

from hf_regionmm.data.synthetic import generate_videos
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.modeling.configuration_ullava import ULLAVA_NEW_TOKENS, ULlavaConfig
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration
from hf_regionmm.processing import processing_ullava
from hf_regionmm.processing.image_processing_ullava import ULlavaImageProcessor
from hf_regionmm.processing.processing_ullava import ULlavaProcessor
from hf_regionmm.systems.ullava import tiny_ullava_words

from .harness import Comparison, compare

__all__ = ["run"]

NEW_TOKENS = 32
QUERY = processing_ullava.res_prompt("red circle", seed=0)
# The peer's box prompt: pixel xyxy in the original 640x480 image, which SamImageProcessor rescales to 1024.
PEER_BOX = [160.0, 120.0, 480.0, 400.0]


def _image(seed: int = 0, size: tuple[int, int] = (640, 480)) -> PIL.Image.Image:
    rng = np.random.RandomState(seed)
    return PIL.Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _scaled_sizes(quick: bool) -> dict:
    """Paper sizes at 1/8 width (quick: also 1/4 depth); token counts and image sides unchanged."""
    depth = 4 if quick else 1
    sam_layers = 32 // depth
    return {
        "llama": {
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 32 // depth,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
        },
        "clip": {
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 24 // depth,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "projection_dim": 96,
            "hidden_act": "quick_gelu",
        },
        "sam": {
            "vision_config": {
                "hidden_size": 160,
                "num_hidden_layers": sam_layers,
                "num_attention_heads": 16,
                # ViT-H: global attention in the last block of each quarter.
                "global_attn_indexes": [sam_layers // 4 * (quarter + 1) - 1 for quarter in range(4)],
                "output_channels": 32,
                "num_pos_feats": 16,
                "mlp_dim": 640,
                "image_size": 1024,
                "patch_size": 16,
            },
            "prompt_encoder_config": {"hidden_size": 32, "image_size": 1024, "patch_size": 16},
            "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 256, "iou_head_hidden_dim": 32},
        },
        "scale": "width 1/8, tokens and image sides 1/1, depth " + ("1/4 (quick)" if quick else "1"),
    }


def _build(quick: bool):
    sizes = _scaled_sizes(quick)
    tokenizer = build_word_tokenizer(tiny_ullava_words(), extra_special_tokens=ULLAVA_NEW_TOKENS)
    config = ULlavaConfig(
        vision_config={"model_type": "clip_vision_model", **sizes["clip"]},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), **sizes["llama"]},
        sam_config=sizes["sam"],
        image_size=224,
        num_video_frames=8,
        loc_box_activation="none",
    )
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**sizes["clip"]),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=config.text_config.pad_token_id, **sizes["llama"]
        ),
        image_token_id=config.image_patch_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    sam_config = SamConfig(**sizes["sam"])
    torch.manual_seed(0)
    ours = ULlavaForConditionalGeneration(config).eval()
    llava = LlavaForConditionalGeneration(llava_config).eval()
    sam = SamModel(sam_config).eval()
    sam_processor = SamImageProcessor(size={"longest_edge": 1024}, pad_size={"height": 1024, "width": 1024})
    processor = ULlavaProcessor(
        ULlavaImageProcessor(size={"height": 224, "width": 224}),
        sam_processor,
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        num_video_frames=config.num_video_frames,
    )
    return sizes, ours, llava, sam, processor, sam_processor


class _ForceAnswerTail:
    """Logits processor: the last `len(tail)` of `new_tokens` generated tokens are `tail` (`[SEG]`, `[LOC]`), as in
    an answer "... Mask: [SEG]; Location: [LOC]", which a random-weight model would rarely write itself."""

    def __init__(self, prompt_length: int, new_tokens: int, tail: list[int]) -> None:
        self.first = prompt_length + new_tokens - len(tail)
        self.tail = tail

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.first
        if 0 <= step < len(self.tail):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tail[step]] = 0.0
            return forced
        return scores


def _one_pass_comparison(quick: bool, repeats: int, built) -> Comparison:
    sizes, ours, llava, sam, processor, sam_processor = built
    image = _image()
    inputs = dict(processor(images=[image], text=[QUERY], return_tensors="pt"))
    prompt = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    generation = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    seg_id, loc_id = ours.config.seg_token_id, ours.config.loc_token_id
    sam_inputs = sam_processor(images=[image], return_tensors="pt")

    force_tail = LogitsProcessorList(
        [_ForceAnswerTail(int(prompt["input_ids"].shape[1]), NEW_TOKENS, [seg_id, loc_id])]
    )

    def ours_pass():
        generated = ours.generate(
            **prompt,
            **generation,
            logits_processor=force_tail,
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        # The heads read the states generation computed: no second pass over prompt + answer.
        prediction = ours.predict(
            generated.sequences,
            pixel_values=inputs["pixel_values"],
            sam_pixel_values=inputs["sam_pixel_values"],
            image_sizes=inputs["image_sizes"],
            attention_mask=inputs["attention_mask"],
            generated_hidden_states=generated.hidden_states,
        )
        assert prediction.masks[0].shape == (1, image.height, image.width) and prediction.boxes[0].shape == (1, 4)
        return prediction

    def peer_pass():
        llava.generate(**prompt, **generation)
        boxes = torch.tensor([[PEER_BOX]]) * (1024 / max(image.size))
        outputs = sam(pixel_values=sam_inputs["pixel_values"], input_boxes=boxes, multimask_output=False)
        masks = sam_processor.post_process_masks(
            outputs.pred_masks, sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"]
        )
        assert masks[0].shape[-2:] == (image.height, image.width)
        return masks

    prompt_length = int(prompt["input_ids"].shape[1])
    return compare(
        f"u-LLaVA text + mask + box, prefill + {NEW_TOKENS} tokens (scaled 7B / ViT-H)",
        ours_pass,
        peer_pass,
        ours_label="ULlavaForConditionalGeneration.generate + predict",
        peer_label="LlavaForConditionalGeneration.generate + SamModel (box prompt)",
        repeats=repeats,
        target="<= 1.0",
        notes=(
            "Same CLIP/Llama/SAM configs and prompt ids; scale in extra. `predict` reads the [SEG]/[LOC] states "
            "from `generate(output_hidden_states=True)` (no second LLM pass); the SAM image encoder runs once on "
            "both sides."
        ),
        extra={"scale": sizes["scale"], "prompt_length": prompt_length, "new_tokens": NEW_TOKENS, "image": "640x480"},
    )


def _video_comparison(repeats: int, built) -> Comparison:
    sizes, ours, _, _, processor, _ = built
    frames = generate_videos(1, seed=0, num_frames=8, image_size=224)[0]["frames"]
    query = processing_ullava.video_caption_prompt(seed=0)
    video_inputs = dict(processor(videos=[frames], text=[query], return_tensors="pt"))
    image_inputs = dict(processor(images=[_image()], text=[query], return_tensors="pt"))
    image_inputs.pop("sam_pixel_values")
    image_inputs.pop("image_sizes", None)
    video_inputs.pop("image_sizes", None)
    return compare(
        "u-LLaVA video prefill (8 frames -> 8 + 256 tokens) vs image prefill (256 tokens)",
        lambda: ours(**video_inputs, logits_to_keep=1),
        lambda: ours(**image_inputs, logits_to_keep=1),
        ours_label="video prefill",
        peer_label="image prefill (same model)",
        repeats=repeats,
        target="-",
        notes="Informational: CLIP over 8 frames + 8 more LLM positions; no PERFORMANCE.md target.",
        extra={
            "scale": sizes["scale"],
            "video_prompt_length": int(video_inputs["input_ids"].shape[1]),
            "image_prompt_length": int(image_inputs["input_ids"].shape[1]),
        },
    )


def _peer_7b_parameters() -> int:
    llava = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224
        ),
        text_config=LlamaConfig(vocab_size=32011, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32),
        image_token_id=32001,
    )
    sam = SamConfig(
        vision_config={
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "global_attn_indexes": [7, 15, 23, 31],
        }
    )
    with torch.device("meta"):
        models = (LlavaForConditionalGeneration(llava), SamModel(sam))
    return sum(parameter.numel() for model in models for parameter in model.parameters())


def _meta_build_comparison(repeats: int) -> Comparison:
    def ours():
        with torch.device("meta"):
            model = ULlavaForConditionalGeneration(ULlavaConfig.from_preset("ullava-7b"))
        return sum(parameter.numel() for parameter in model.parameters())

    return compare(
        "ullava-7b preset on the meta device",
        ours,
        _peer_7b_parameters,
        ours_label="ULlavaConfig.from_preset('ullava-7b')",
        peer_label="LLaVA (CLIP-L/224 + Vicuna-7B) + SAM ViT-H configs",
        repeats=repeats,
        warmup=0,
        target="ours < 5 s",
        notes="Seconds to build config + model on the meta device; no weight memory is allocated.",
        extra={"ullava_parameters": ours(), "peer_parameters": _peer_7b_parameters()},
    )


def run(quick: bool = False) -> list[Comparison]:
    """All u-LLaVA measurements; `quick` uses fewer repetitions and a 1/4-depth model."""
    built = _build(quick)
    # One text + mask + box pass costs ~20 s of CPU time in quick mode (SAM's global attention over 64x64 patches
    # dominates), ~4x that at full depth, hence few repetitions.
    comparisons = [_one_pass_comparison(quick, 2 if quick else 3, built)]
    comparisons.append(_video_comparison(3 if quick else 7, built))
    comparisons.append(_meta_build_comparison(1 if quick else 3))
    return comparisons
