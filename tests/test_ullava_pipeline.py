"""transformers' `pipeline("image-text-to-text")` serves u-LLaVA offline (issue 7, acceptance).

The pipeline loads a saved tiny u-LLaVA folder through `AutoModelForImageTextToText` / `AutoProcessor` (or takes the
model and processor objects), builds the inputs with `ULlavaProcessor` (plain prompt, or chat messages through the
processor's `chat_template`), generates, and decodes with `post_process_image_text_to_text`. The generated text must
equal what a hand-written processor -> `generate` -> decode pass gives for the same prompt. Masks and boxes are not
the pipeline's job (`predict` + `post_process_*`, tested in test_ullava_modeling.py).
"""

import pytest
import torch
from transformers import pipeline

from hf_regionmm.data.synthetic import generate_scenes
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration
from hf_regionmm.processing.processing_ullava import ULlavaProcessor
from hf_regionmm.systems.ullava import tiny_ullava_config, tiny_ullava_processor

NEW_TOKENS = 6
QUERY = "where is the red circle?"
# Copied per call: the pipeline writes `max_new_tokens` into the dict it is given.
GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ULlavaForConditionalGeneration(tiny_ullava_config()).eval()
    folder = tmp_path_factory.mktemp("ullava-tiny")
    model.save_pretrained(folder)
    tiny_ullava_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image():
    return generate_scenes(1, seed=5, image_size_range=(64, 96), with_masks=False)[0]["image"]


@pytest.fixture(scope="module")
def pipe(saved_dir):
    return pipeline("image-text-to-text", model=str(saved_dir))


def _reference_answer(model, processor, image, prompt: str) -> str:
    """Processor -> greedy `generate` -> decode of the new tokens, written out by hand."""
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    inputs.pop("sam_pixel_values")
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] >= 1
    return processor.post_process_image_text_to_text(new_tokens)[0]


def test_pipeline_loads_ullava_from_a_saved_folder(pipe):
    assert isinstance(pipe.model, ULlavaForConditionalGeneration)
    assert isinstance(pipe.processor, ULlavaProcessor)


def test_image_and_prompt_give_the_generated_text(pipe, image):
    outputs = pipe(
        images=image, text=QUERY, max_new_tokens=NEW_TOKENS, return_full_text=False, generate_kwargs=dict(GREEDY)
    )
    assert len(outputs) == 1 and isinstance(outputs[0]["generated_text"], str)
    expected = _reference_answer(pipe.model, pipe.processor, image, QUERY)
    # The pipeline cuts the decoded prompt off the decoded sequence, which leaves the separating space.
    assert outputs[0]["generated_text"].lstrip() == expected
    # return_full_text (the default) prepends the prompt text.
    full = pipe(images=image, text=QUERY, max_new_tokens=NEW_TOKENS, generate_kwargs=dict(GREEDY))
    assert full[0]["generated_text"] == QUERY + outputs[0]["generated_text"]


def test_chat_messages_give_an_assistant_turn(saved_dir, image):
    # Model and processor objects, as users pass after loading them themselves.
    model = ULlavaForConditionalGeneration.from_pretrained(saved_dir).eval()
    processor = ULlavaProcessor.from_pretrained(saved_dir)
    chat = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUERY}]}]
    outputs = chat(text=messages, max_new_tokens=NEW_TOKENS, generate_kwargs=dict(GREEDY))
    conversation = outputs[0]["generated_text"]
    assert [turn["role"] for turn in conversation] == ["user", "assistant"]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.rstrip().endswith("ASSISTANT:") and "<image>" in prompt
    assert conversation[-1]["content"].strip() == _reference_answer(model, processor, image, prompt).strip()
