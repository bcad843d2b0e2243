"""Groma's part of `hf-regionmm demo`: train a tiny Groma through the paper's three stages and show that it learned.

The run (a few minutes on 2 CPU cores):

1. build the tiny Groma and its offline processor, and evaluate the untrained model on held-out synthetic scenes
   (`hf_regionmm.evaluation.groma_eval`: REC acc@0.5, AS-MANY AR, region-caption CIDEr-D);
2. train with `GromaTrainer`, stage by stage (paper Sec. 3.3, Table 10): `det` (the class-agnostic proposer learns
   to box the shapes from frozen image features, Hungarian set loss), `align` (region encoder, projector and the new
   tokens learn to feed the frozen LLM) and `instruct` (the same plus the LLM, on REC / multi-grounding / region
   caption / grounded caption turns, REC weighted up);
3. evaluate again, save the checkpoint (safetensors + processor + a model card with the results) and pictures of
   held-out scenes with the predicted REC boxes and a grounded caption.

What the demo changes from the paper, and why: the tiny model starts from random weights (no DINOv2/Vicuna
download), so the learning rates are 10-100x the paper's 7B ones (`GromaDemoRecipe`), the new-token embeddings and
the region encoder are re-initialised for training from scratch (`init_for_training_from_scratch`), the proposer
reads one feature level with a single objectness head and 2 decoder layers (the 4-level x4 pyramid costs more CPU
time than the demo has), NMS keeps fewer near-duplicate boxes (0.5 instead of 0.6), scenes hold 2-4 shapes and the
tiny LLM starts at a weight scale for its width (`initializer_range` 0.125 = 1/sqrt(64), where Llama's 0.02 is
~1.3/sqrt(4096) for 7B widths; at 0.02 the 64-wide LLM learns much slower: region-caption CIDEr-D 0.47 / 0.56
with 0.02 against 1.49 / 0.93 with 0.125, seeds 0 / 1, the rest of the demo unchanged). The image encoder stays
frozen in every stage, as in the paper.

What it learns in its ~3 minutes (measured on 64 held-out scenes, 409 expressions): the proposer learns to box the
shapes (about 78-87% of referred objects get a region with IoU > 0.5, by run), the LLM learns the answer formats, and
region captions name the shapes' attributes (CIDEr-D ~0 -> ~0.9-1.5 by seed). REC acc@0.5 goes from 0 to ~0.26-0.30,
but that is the proposer's top-scoring region (`<r0>` in 88-100% of answers, by run): a 64-wide 2-layer LLM trained
from scratch does not learn to pick the slot that matches the expression within this budget (the pointer has to
bridge ~100 prompt tokens; REC-only runs of 3000 steps, 3-layer or 128-wide LLMs and multi-turn REC conversations
did not get it either). The card and `metrics.json` report the share of REC answers that name `<r0>`, REC acc@0.5
per expression kind (attribute / relation / ordinal) and two reference points on the same regions: always answering
`<r0>` (`rec_first_region_acc@0.5`) and always the best-overlapping slot (`rec_best_region_acc@0.5`, the ceiling
the proposals set). One run of the defaults: REC acc@0.5 0.303 against 0.313 for always `<r0>` and 0.785 for the
best slot (`<r0>` in 96% of answers), 3.1 min. Runs repeat exactly for a fixed torch thread count (checked across
processes and under load) but move with it through float rounding: a shortened recipe (det 300, align 50,
instruct 300) ends at region-caption CIDEr-D 0.45 with 2 threads and 1.00 with 1.

Why slot selection is not learned (measured; 32 held-out scenes, 193 expressions, the same det proposer, 150 align +
1200 instruct steps each):

- the label mask is right (only answer tokens count), but the REC `<rK>` targets are 2.6% of the supervised tokens
  of the default mix (all `<rK>` targets 11.7%; grounded captions dominate);
- region tokens of different objects in one scene are nearly the same vector: cosine similarity 0.87 at
  initialisation, 0.996 after training (1.000 with region tokens started at the LLM scale); a linear probe reads
  colour from them at 57% (10 classes) before and 29% after training, shape at chance (17%, 8 classes) before and
  after: the frozen random 32-wide DINOv2 does not carry shape through RoIAlign, and training collapses what colour
  there was;
- shuffled slots in training (`shuffle_regions_in_training`) cut the `<r0>` share from 97% to 42% but REC acc@0.5
  to 0.22 (the answer is then a guess); plus region tokens at the LLM's embedding scale
  (`region_tokens_at_llm_scale`): 0.24, `<r0>` 44%, AR 0.07; plus a REC-heavy mix (7 of 12 samples): 0.13;
  training the image encoder in align/instruct (`vision_tower_stages`) moves the features under the frozen proposer:
  REC 0.02, AR 0.01;
- training the image encoder together with the proposer in `det` and freezing it after
  (`vision_tower_stages=("det",)`; full demo, 64 scenes / 409 expressions, ~285 s CPU): REC acc@0.5 0.31, `<r0>`
  82%, AR 0.15, CIDEr-D 0.47, i.e. no gain. The box loss does not teach the features colour or shape: linear probes
  on region tokens of the ground-truth boxes (same untrained region encoder) read colour at 58% / shape at 22%
  untrained and 43% / 13% after `det` (shape at chance; the class-agnostic set loss needs neither), 31% / 14% after
  all stages (cosine between a scene's region tokens 0.88 -> 1.000). Adding shuffled slots and a
  REC-heavy mix (4 of 7 samples): REC 0.24, `<r0>` 12% (a real spread of answers, but guesses), AR 0.11,
  probes 27% / 17%. The region encoder has no normalisation of its features before `output_proj` to try without a
  new model option.
- an image encoder that carries the attributes does not fix it. Pretraining the tiny DINOv2 before `det` as a
  stand-in for DINOv2's own pretraining (8192 other training scenes; linear heads classify each ground-truth box's
  shape / colour / size from 2x2 RoIAlign bins of the last 3 layers; 4000 steps, ~110 s) reaches 57% / 98% / 75%
  on held-out objects (chance 12% / 10% / 33%). With that encoder frozen (32 held-out scenes, 193 expressions; same
  det proposer): full recipe + shuffled slots REC 0.27 (`<r0>` 24%); REC-only instruct with shuffled slots 0.08,
  + LLM-scale region tokens 0.04, 4-layer LLM for 2000 steps 0.07; multi-turn REC (every expression of a scene in
  one conversation, ~6 supervised `<rK>` per sample) 0.18. The per-token loss of REC answers stays at the
  slot-guessing level (~0.42) from step 600 on in every run.
- what is missing is the LLM's retrieval circuit. Naming slot K means attending from the answer to the region
  that matches the expression and copying the `<rK>` written before it: associative recall. The same 2-layer
  64-wide Llama trained alone on a clean version (8 index/value token pairs, then one value; answer its index)
  stays at chance after 5000 steps of batch 32 (as do 128-wide and 4-layer ones after 3000); with 8 queries per
  sequence it learns it after ~1000 steps (96% held-out). On Groma's own tokens (`<rK>` + word pairs through
  `new_token_embeddings` / `extra_lm_head`) the circuit forms after 1500-2250 steps (~35 s; when depends on the
  seed), yet a model warmed up that way and then trained on multi-turn REC with shuffled slots still answers at
  chance (0.20): matching a multi-word expression to a region feature is a larger step than matching a token to
  itself. In the REC layout itself (text-only: `<rK> word` slots, then 8 turns "Locate <p>the word</p> ..." ->
  `<roi><rK></roi>`, batch 16) the circuit does not form in 3000 steps (~140 s; slot accuracy at chance, 0.13).
  A pretrained LLM (Vicuna in the paper) brings the circuit; a tiny random one needs more than the demo's minutes
  of CPU.
- what blocks it is the distance between expression and answer. On abstract slots (`<rK>` + one token standing
  for a colour-shape pair, or the mean embedding of the two words), the same Llama learns to answer `<rK>` right
  after the two words in ~1500 steps of batch 32, but with three tokens between the words and the answer (as in
  REC, where `<rK>` comes ~6 tokens after `</p>`) it stays at chance for 8000 steps, also 3-layer, 128-wide, at
  lr 3e-3 or batch 256. After 2000 steps of the adjacent form, the gapped form follows in ~1400 more (0.6).
- even perfect region tokens do not make it learnable in the demo's budget. With every region token replaced by
  the mean input embedding of its object's size, colour and shape words (zero for proposals matching no object)
  and the image tokens by zeros, the LLM alone trained on the instruct mix (grounded caption, multi-turn REC,
  REC, region caption; batch 16, lr 1e-3; pretrained image encoder and det proposer as above) reaches, after
  6000 steps (12.5 min), `<rK>` accuracy on its training batches of 0.45 (REC) / 0.45 (multi-turn REC) / 0.54
  (grounded caption), against 0.41 / 0.31 / 0.32 for always answering `<r0>` and 0.22 / 0.20 / 0.20 for a
  uniform guess over the filled slots (a 4-layer 128-wide LLM is no faster per step). Starting align (300 steps)
  and instruct (1200) from that LLM with the real region encoder: REC acc@0.5 0.28, `<r0>` 41%, attribute
  expressions 0.29. So no change on the visual side (image encoder, region encoder, projector) reaches REC 0.6
  here; the LLM's in-context retrieval is the bottleneck.

- the retrieval circuit can be taught to the tiny LLM in minutes, but only in steps, and then the image encoder is the
  limit (text-only warm-up of the LLM as a stand-in for its pretraining; region slots = mean input embedding of the
  object's size / colour / shape words, image tokens zero; Adam lr 1e-3; 2 CPU threads). At `initializer_range` 0.02
  the adjacent form ("user : the red circle" -> `<rK>`, 2-4 filled slots of 8, 8 queries per sequence, batch 32) stays
  at chance for 3000-4000 steps in 5 of 7 runs (other mixes, lr 3e-3, 2-word slots, the LM loss on every token) and
  starts learning at ~1000 / ~2750 steps in the other two; at 0.125 (seed 0) it learns in ~750 steps (0.61; 0.90 at
  1500, ~90 s). The REC form in Groma's layout (the template between expression and answer), started from scratch,
  stays at chance for 3000 steps even at 0.125; as a curriculum it follows: adjacent 1500 steps, then the REC form in
  a short prompt 1000 steps (0.90 after 750), then the full chat layout with region-caption turns 1000 steps
  (0.87-0.91 at once; ~290 s in all), then the processor's own training examples with oracle slots 1500 steps (~130
  s): `<rK>` accuracy there 0.55 on REC (oracle slots carry no position, so relation and ordinal expressions are
  guesses) and ~0.75-0.88 in grounded captions. With that LLM, the stand-in pretrained image encoder and its det
  proposer (above), align 300 steps (LLM frozen; loss 0.89, against 3.45 from the LLM warmed up without the
  processor's examples) gives REC acc@0.5 0.275 with `<r0>` 55%, align 1200 steps 0.316 (`<r0>` 68%), align 600 steps
  with region tokens started at the LLM scale 0.269 (`<r0>` 64%); align 300 + instruct 1200 steps at lr 1e-3: 0.176,
  at 3e-4: 0.254. The region tokens of that model read as words (its region captions of ground-truth boxes name the
  size 68% / colour 77% of the time) but not the shape (23%, chance 12%), and REC's attribute expressions are mostly
  the shape alone ("the hexagon"): the tiny frozen image encoder, which sees a 16-58 pixel shape in 1-4 patches, is
  the next limit. Longer stand-in pretraining of the image encoder does not lift shape: 8000 steps on 4096 scenes
  (~160 s) reach 59% shape / 98% colour / 76% size on held-out objects, with the training loss still falling (the
  32-wide encoder at 112 pixels, not its training, is the limit).

- two cheap changes to the LLM do not shorten the plateau (text-only REC form from scratch, oracle slots as above,
  8 queries per sequence, batch 32, 2000 steps each, 1 thread): `extra_lm_head`'s rows tied to (or started equal to)
  the `<rK>` input embeddings, so that copying a slot's `<rK>` needs no learned read-out: 0.35 (chance ~0.33);
  1 head of 64 or 2 heads of 32 dimensions instead of 4 of 16: 0.36 / 0.36.
- real region tokens make even the adjacent form slow: the same adjacent task ("user : the red circle" -> `<rK>`)
  with region tokens from the region encoder over the stand-in pretrained image encoder's features of the
  ground-truth boxes (encoder and LLM trained together from scratch; region tokens at the LLM scale, or scaled by
  0.25) stays at chance for 1500 steps (0.38 / 0.35), where oracle slots learn it in ~750.

None beats the score-order shortcut, so the defaults keep the previous recipe (with the LLM initialised at the
tiny scale).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from ..data.pictures import draw_boxes, draw_grounding
from ..data.synthetic import generate_scenes
from ..evaluation.groma_eval import (
    GROMA_EVAL_SCENES,
    evaluate_groma,
    generate_groma_answers,
    groma_eval_scenes,
    rec_accuracy_by_kind,
)
from ..modeling.modeling_groma import GromaForConditionalGeneration
from ..processing.processing_groma import grounded_caption_prompt, rec_prompt
from ..trainers.groma import GROMA_STAGES, GromaTrainingDataset
from ..trainers.region_trainer import stage_by_name
from ..trainers.tiny_training import build_tiny_trainer
from .demo_outputs import before_after_table, save_demo_checkpoint, write_demo_metrics

__all__ = ["GromaDemoRecipe", "QUICK_RECIPE", "groma_demo", "init_for_training_from_scratch"]


@dataclass(frozen=True)
class GromaDemoRecipe:
    """What the Groma demo trains, on what, for how long.

    Args:
        config_overrides: keyword arguments of `tiny_groma_config` (sub-config dicts are merged into the preset's).
        num_train_scenes: synthetic training scenes (split "train"); every epoch draws other expressions and
            rotates the task of each scene, so the scenes are reused without repeating examples.
        num_eval_scenes: held-out scenes (split "test") evaluated before and after training.
        batch_size: per-step batch of every stage.
        det_steps, align_steps, instruct_steps: optimisation steps per stage.
        det_lr, align_lr, instruct_lr: peak learning rates (cosine decay, linear warm-up). The paper's 2e-4 / 1e-4 /
            1e-5 are for pretrained 7B weights; the tiny random model needs larger ones.
        warmup_ratio: warm-up share of each stage's steps.
        instruct_tasks: task of sample i is `instruct_tasks[i % len]` (REC repeated to weight it up).
        eval_tasks: what `evaluate_groma` measures before and after.
        num_pictures: held-out scenes drawn with their predictions.
        init_for_scratch: re-initialise the new-token embeddings and the region encoder for training from scratch
            (see `init_for_training_from_scratch`).
        region_tokens_at_llm_scale: start region tokens at the LLM embedding norm (`init_for_training_from_scratch`).
        shuffle_regions_in_training: randomly permute the proposal slots in `align` and `instruct` (the released
            code shuffles; `config.shuffle_regions`), so that `<r0>` is no longer the likeliest answer. Evaluation
            and the saved config keep the deterministic score order either way.
        vision_tower_stages: stages in which the (otherwise frozen) image encoder trains too, e.g.
            `("align", "instruct")`. The proposer reads the same features and does not train there, so its boxes
            degrade (measured: REC acc@0.5 0.02, AR 0.01). `("det",)` trains it with the proposer and keeps the
            two consistent (measured: REC acc@0.5 0.31 as without it; see the module docstring).
        seed: seeds data, initialisation and training.
    """

    config_overrides: Mapping[str, Any] = field(
        default_factory=lambda: {
            # Stricter NMS than the released 0.6: a second, slightly shifted box on the same shape is a slot the
            # LLM cannot tell from the first, and its `<rK>` label then looks random.
            "nms_thres": 0.5,
            # Llama's initializer_range 0.02 is ~1.3/sqrt(hidden) at 4096 wide; at the tiny LLM's 64 the same scale
            # is 1/sqrt(64). With 0.02 the tiny LLM starts near attention's flat point and learns much slower
            # (measured: region-caption CIDEr-D 0.47 -> 1.49 and 0.56 -> 0.93 in the same steps, seeds 0 and 1).
            "text_config": {"initializer_range": 0.125},
            "proposer_feature_source": "mean_last_4",
            "proposer_config": {
                "num_feature_levels": 1,
                "objectness_heads": ["coco"],
                "objectness_weights": [1.0],
                "d_model": 64,
                "encoder_ffn_dim": 128,
                "decoder_ffn_dim": 128,
                "decoder_layers": 2,
            },
        }
    )
    num_train_scenes: int = 1024
    num_eval_scenes: int = 64
    batch_size: int = 8
    det_steps: int = 1200
    align_steps: int = 150
    instruct_steps: int = 1200
    det_lr: float = 1e-3
    align_lr: float = 1e-3
    instruct_lr: float = 1e-3
    warmup_ratio: float = 0.03
    instruct_tasks: Sequence[str] = (
        "rec",
        "rec",
        "multi_grounding",
        "region_caption",
        "region_caption",
        "grounded_caption",
    )
    eval_tasks: Sequence[str] = ("rec", "multi_grounding", "region_caption")
    num_pictures: int = 4
    init_for_scratch: bool = True
    region_tokens_at_llm_scale: bool = False
    shuffle_regions_in_training: bool = False
    vision_tower_stages: Sequence[str] = ()
    seed: int = 0


# A reduced run for tests: the same code path in seconds; it shows the plumbing, not learning.
QUICK_RECIPE = GromaDemoRecipe(
    num_train_scenes=16,
    num_eval_scenes=4,
    batch_size=4,
    det_steps=2,
    align_steps=1,
    instruct_steps=2,
    num_pictures=2,
)


def init_for_training_from_scratch(
    model: GromaForConditionalGeneration, region_tokens_at_llm_scale: bool = False
) -> None:
    """Re-initialise Groma's new-token embeddings and region encoder for a model whose LLM starts from random weights.

    The released initialisation assumes a pretrained 4096-wide LLM and 1024-channel image features: every new token
    starts at the mean LLM embedding (so `<r0>` ... `<rM>` are identical vectors, and only a pretrained LLM's
    position handling tells the slots apart), and the region-encoder convs start at N(0, 0.01), which keeps the
    signal's scale at 1024 input channels but shrinks it ~6x per conv at the tiny model's 32. Here the new tokens get
    distinct N(0, initializer_range) rows and the region encoder PyTorch's fan-in scaled default.

    Args:
        model: the model to re-initialise in place.
        region_tokens_at_llm_scale: also draw `output_proj` from N(0, initializer_range / sqrt(E)) with a zero bias,
            so region tokens start at the norm of the LLM's embeddings (initializer_range * sqrt(hidden); measured
            0.17 vs 0.16 in the tiny model) instead of ~24x above it (3.8 with the fan-in default). The region
            embedding before `output_proj` has O(1) coordinates (the position MLP ends in a LayerNorm).
    """
    initializer_range = model.config.text_config.initializer_range
    region_encoder = model.model.region_encoder
    with torch.no_grad():
        model.model.new_token_embeddings.weight.normal_(std=initializer_range)
        for module in region_encoder.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.reset_parameters()
        if region_tokens_at_llm_scale:
            embed_dim = region_encoder.output_proj.in_features
            region_encoder.output_proj.weight.normal_(std=initializer_range / embed_dim**0.5)
            region_encoder.output_proj.bias.zero_()


class _ProgressCallback(TrainerCallback):
    """Report the training loss of a stage through the demo's `progress` callback, every `every` steps."""

    def __init__(self, progress: Callable[[str], None], stage: str, max_steps: int, every: int) -> None:
        self.progress, self.stage, self.max_steps, self.every = progress, stage, max_steps, every

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs and (state.global_step % self.every == 0 or state.global_step == self.max_steps):
            self.progress(f"groma {self.stage}: step {state.global_step}/{self.max_steps}, loss {logs['loss']:.4f}")


def _train_stage(
    model: GromaForConditionalGeneration,
    processor: Any,
    stage: str,
    dataset: torch.utils.data.Dataset,
    steps: int,
    learning_rate: float,
    recipe: GromaDemoRecipe,
    output_dir: Path,
    progress: Callable[[str], None],
) -> list[float]:
    """Train `stage` for `steps` and return the logged losses (first to last)."""
    from .groma import GROMA_SYSTEM

    paper_stage = stage_by_name(GROMA_STAGES, stage)
    logging_steps = max(1, steps // 10)
    trainer = build_tiny_trainer(
        GROMA_SYSTEM,
        output_dir / f"trainer-{stage}",
        max_steps=steps,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        learning_rate=learning_rate,
        weight_decay=paper_stage.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=int(recipe.warmup_ratio * steps),
        logging_steps=logging_steps,
        model=model,
        processor=processor,
        train_dataset=dataset,
        stage=stage,
    )
    if stage in recipe.vision_tower_stages:
        trainer.stages = tuple(
            dataclasses.replace(entry, trainable=(*entry.trainable, "model.vision_tower."))
            if entry.name == stage
            else entry
            for entry in trainer.stages
        )
        trainer.set_stage(stage)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_ProgressCallback(progress, stage, steps, every=max(1, steps // 4)))
    counts = trainer.stage_parameter_counts
    description = paper_stage.description
    if stage in recipe.vision_tower_stages:
        # The paper's stage text says the image encoder is frozen; this recipe trains it here.
        description = (
            description.replace("frozen DINOv2", "DINOv2") + " + the image encoder (recipe.vision_tower_stages)"
        )
    progress(
        f"groma {stage}: {description}; {counts['trainable']:,} trainable / {counts['frozen']:,} frozen "
        f"parameters, {steps} steps at lr {learning_rate:g}"
    )
    # Shuffled slots in training (as released) take away the "answer <r0>" shortcut of score-sorted slots; evaluation
    # and the saved config keep the deterministic order, so `<rK>` indexes `get_regions`' boxes.
    evaluation_order = model.config.shuffle_regions
    model.config.shuffle_regions = recipe.shuffle_regions_in_training and stage != "det"
    try:
        trainer.train()
    finally:
        model.config.shuffle_regions = evaluation_order
    scratch = output_dir / f"trainer-{stage}"
    # Nothing is checkpointed mid-stage (save_strategy "no"), so the trainer's folder stays empty; drop it.
    if scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _pictures(
    model: GromaForConditionalGeneration, processor: Any, scenes: Any, directory: Path, scale: int = 3
) -> list[dict[str, Any]]:
    """Draw, for each scene, the predicted REC boxes of its expressions and a generated grounded caption."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [scenes[index] for index in range(len(scenes))]
    expressions = [
        (index, expression) for index, row in enumerate(rows) for expression in row["referring_expressions"]
    ]
    rec_answers = generate_groma_answers(
        model,
        processor,
        [rows[index]["image"] for index, _ in expressions],
        [rec_prompt(expression["text"]) for _, expression in expressions],
        max_new_tokens=6,
    )
    caption_answers = generate_groma_answers(
        model, processor, [row["image"] for row in rows], [grounded_caption_prompt()] * len(rows), max_new_tokens=64
    )
    index_entries = []
    for index, row in enumerate(rows):
        # Pictures are upscaled so the labels (PIL's default bitmap font) stay readable next to 112-192 pixel scenes.
        image = row["image"].convert("RGB")
        image = image.resize((image.width * scale, image.height * scale))
        found = [
            (expression["text"], answer.rec_box)
            for (scene, expression), answer in zip(expressions, rec_answers, strict=True)
            if scene == index and answer.rec_box is not None
        ]
        rec_picture = draw_boxes(
            image, [[value * scale for value in box] for _, box in found], labels=[text for text, _ in found]
        )
        rec_path = directory / f"scene{index}_rec.png"
        rec_picture.save(rec_path)
        grounding = [
            {"phrase": entry["phrase"] or "", "boxes": [[value * scale for value in box] for box in entry["boxes"]]}
            for entry in caption_answers[index].grounding
        ]
        caption_path = directory / f"scene{index}_grounded_caption.png"
        draw_grounding(image, grounding).save(caption_path)
        index_entries.append(
            {
                "scene": index,
                "rec_picture": rec_path.name,
                "rec": [
                    {"expression": expression["text"], "predicted_box": answer.rec_box, "answer": answer.text}
                    for (scene, expression), answer in zip(expressions, rec_answers, strict=True)
                    if scene == index
                ],
                "grounded_caption_picture": caption_path.name,
                "grounded_caption": caption_answers[index].text,
            }
        )
    (directory / "pictures.json").write_text(json.dumps(index_entries, indent=1))
    return index_entries


def _first_region_index(answer: str) -> int | None:
    """K of the first `<rK>` in a decoded answer, None without one."""
    match = re.search(r"<r(\d+)>", answer)
    return int(match.group(1)) if match else None


def _training_summary(
    recipe: GromaDemoRecipe,
    before: Mapping[str, float],
    after: Mapping[str, float],
    top_region_share: float | None,
    rec_by_kind: Mapping[str, float] | None = None,
    initializer_range: float | None = None,
) -> str:
    return (
        "This tiny checkpoint was trained by `hf-regionmm demo` from random weights"
        + (f" (LLM drawn at initializer_range {initializer_range:g})" if initializer_range is not None else "")
        + " on procedurally generated "
        f"scenes of 2-4 coloured shapes ({recipe.num_train_scenes} training scenes): `det` {recipe.det_steps} steps "
        f"at lr {recipe.det_lr:g}, `align` {recipe.align_steps} steps at lr {recipe.align_lr:g}, `instruct` "
        f"{recipe.instruct_steps} steps at lr {recipe.instruct_lr:g}, batch {recipe.batch_size} (the paper's learning "
        "rates are for pretrained 7B weights; a tiny random model needs larger ones). Held-out scenes before and "
        f"after training:\n\n{before_after_table(before, after)}"
        + (
            f"\n{100 * top_region_share:.0f}% of the trained model's REC answers name `<r0>`, the proposer's "
            "top-scoring region."
            if top_region_share is not None
            else ""
        )
        + (
            " On the same regions, always answering `<r0>` scores "
            f"{after['rec_first_region_acc@0.5']:.3f} and always the best-overlapping slot "
            f"{after['rec_best_region_acc@0.5']:.3f} (the ceiling the proposals set): REC acc@0.5 above the first "
            f"is what the LLM's choice of slot adds ({after['rec_acc@0.5'] - after['rec_first_region_acc@0.5']:+.3f})."
            if "rec_first_region_acc@0.5" in after
            else ""
        )
        + ("\n" if top_region_share is not None or "rec_first_region_acc@0.5" in after else "")
        + (
            "REC acc@0.5 of the trained model by expression kind: "
            + ", ".join(f"{kind} {value:.3f}" for kind, value in rec_by_kind.items())
            + ".\n"
            if rec_by_kind
            else ""
        )
    )


def groma_demo(
    output_dir: Path,
    progress: Callable[[str], None] = print,
    *,
    quick: bool = False,
    recipe: GromaDemoRecipe | None = None,
) -> dict[str, float]:
    """Train a tiny Groma through det -> align -> instruct on synthetic scenes and measure what it learned.

    Args:
        output_dir: folder for everything the run writes: `checkpoint/` (model, processor, README.md card),
            `pictures/` (held-out scenes with predicted REC boxes and a grounded caption, plus `pictures.json`),
            `metrics.json`, and the trainers' scratch folders.
        progress: called with one-line progress messages.
        quick: run `QUICK_RECIPE` (a few steps, seconds; for tests) instead of the full demo.
        recipe: an explicit `GromaDemoRecipe` (overrides `quick`).

    Returns:
        Floats: `rec_acc@0.5_before` / `_after`, `ar_before` / `_after`, and the other `evaluate_groma` metrics with
        the same suffixes (`rec_miou`, `rec_no_box_rate`, `ar50`, `ar75`, `region_caption_cider_d`), plus
        `train_seconds`.
    """
    from .groma import tiny_groma_config, tiny_groma_processor

    recipe = recipe or (QUICK_RECIPE if quick else GromaDemoRecipe())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)
    config = tiny_groma_config(**dict(recipe.config_overrides))
    model = GromaForConditionalGeneration(config)
    if recipe.init_for_scratch:
        init_for_training_from_scratch(model, region_tokens_at_llm_scale=recipe.region_tokens_at_llm_scale)
    processor = tiny_groma_processor(max_region_num=config.max_region_num)
    if processor.num_image_tokens != config.num_image_tokens:
        raise ValueError(
            "`recipe.config_overrides` changes `image_size`, which the tiny processor does not follow; keep the "
            f"tiny preset's image size ({processor.image_processor.size})."
        )

    eval_scenes = groma_eval_scenes(recipe.num_eval_scenes, seed=recipe.seed)
    progress(f"groma: evaluating the untrained model on {len(eval_scenes)} held-out scenes")
    before_predictions: dict[str, list[dict[str, Any]]] = {}
    before = evaluate_groma(model, processor, eval_scenes, tasks=recipe.eval_tasks, predictions=before_predictions)

    started = time.perf_counter()
    train_scenes = generate_scenes(recipe.num_train_scenes, seed=recipe.seed, split="train", **GROMA_EVAL_SCENES)
    losses = {}
    for stage, steps, learning_rate, tasks in (
        ("det", recipe.det_steps, recipe.det_lr, ("detection",)),
        ("align", recipe.align_steps, recipe.align_lr, recipe.instruct_tasks),
        ("instruct", recipe.instruct_steps, recipe.instruct_lr, recipe.instruct_tasks),
    ):
        if steps == 0:
            continue
        dataset = GromaTrainingDataset(train_scenes, tasks=tasks, seed=recipe.seed)
        losses[stage] = _train_stage(
            model, processor, stage, dataset, steps, learning_rate, recipe, output_dir, progress
        )
    train_seconds = time.perf_counter() - started

    progress("groma: evaluating the trained model on the same held-out scenes")
    after_predictions: dict[str, list[dict[str, Any]]] = {}
    after = evaluate_groma(model, processor, eval_scenes, tasks=recipe.eval_tasks, predictions=after_predictions)
    rec_answers = [sample["answer"] for sample in after_predictions.get("rec", [])]
    # How often REC names the first slot tells a learned expression-to-region match from the top-score shortcut.
    first_slots = [_first_region_index(answer) for answer in rec_answers]
    top_region_share = sum(slot == 0 for slot in first_slots) / len(first_slots) if first_slots else None
    # Per expression kind (attribute / relation / ordinal): attribute expressions need no spatial reasoning, so their
    # accuracy tells a learned expression-to-region match from the shortcut most directly.
    by_kind = {
        stage: rec_accuracy_by_kind(stage_predictions["rec"])
        for stage, stage_predictions in (("before", before_predictions), ("after", after_predictions))
        if "rec" in stage_predictions
    }

    save_demo_checkpoint(
        model,
        processor,
        output_dir,
        "groma",
        model_id="groma-tiny-demo",
        eval_results=after,
        eval_dataset=f"hf_regionmm synthetic (held-out split, {len(eval_scenes)} scenes)",
        training_summary=_training_summary(
            recipe,
            before,
            after,
            top_region_share,
            by_kind.get("after"),
            initializer_range=config.text_config.initializer_range,
        ),
    )
    picture_scenes = eval_scenes.select(range(min(recipe.num_pictures, len(eval_scenes))))
    _pictures(model, processor, picture_scenes, output_dir / "pictures")

    metrics = write_demo_metrics(
        output_dir,
        before,
        after,
        train_seconds,
        recipe,
        rec_answers_naming_r0=top_region_share,
        rec_acc_by_kind=by_kind,
        losses=losses,
    )
    progress(
        f"groma: REC acc@0.5 {before['rec_acc@0.5']:.3f} -> {after['rec_acc@0.5']:.3f} (always `<r0>` "
        f"{after['rec_first_region_acc@0.5']:.3f}, best slot {after['rec_best_region_acc@0.5']:.3f}), AR "
        f"{before['ar']:.3f} -> {after['ar']:.3f} after {train_seconds / 60:.1f} min of training"
        if "rec_acc@0.5" in after and "ar" in after
        else f"groma: trained in {train_seconds / 60:.1f} min"
    )
    return metrics
