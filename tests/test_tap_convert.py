"""Conversion of released TAP v1.x checkpoints (`hf_regionmm/hub/convert_tap.py`).

A synthetic "release" is built from a tiny `TapModel` whose every weight and buffer is random: its state dict is
renamed back to the ORIGINAL tokenize-anything key names by an inverse mapping written here independently of the
converter (`Predictor.layers.i`, `blocks`, `norm1-4`, `fc1/fc2`, BGR patch embedding, `pixel_mean` / `pixel_rsig`),
pickled as a dict of numpy arrays (with a `concepts/*.pkl`-style bank), converted, and loaded back through the Auto
classes: outputs must equal the source model's. Malicious pickles must be refused without running anything, and bad
checkpoints must fail with a clear error and leave no folder behind.
"""

import builtins
import os
import pickle
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskGeneration, AutoProcessor

import hf_regionmm  # noqa: F401  (registers the Auto classes)
from hf_regionmm.hub.convert_tap import (
    TapConversionWarning,
    UnsafePickleError,
    convert_tap_checkpoint,
    convert_tap_state_dict,
    infer_tap_model_type,
    load_tap_concepts,
    load_tap_weights,
    restricted_load_pickle,
    tap_config_from_weights,
)
from hf_regionmm.modeling.configuration_tap import TapConfig
from hf_regionmm.modeling.modeling_tap import TapModel
from hf_regionmm.systems.tap import tiny_tap_tokenizer

LOGIT_SCALE = 100.0
CONCEPTS = ["cat", "dog", "red ball", "tree", "sky"]
BGR_MEAN = np.array([103.53, 116.28, 123.675], dtype=np.float32)
BGR_STD = np.array([57.375, 57.12, 58.395], dtype=np.float32)


def _source_config() -> TapConfig:
    # Sizes follow the release's rules the weights cannot show (decoder heads = embed_dim / 32, text heads =
    # text width / 64), so the converter's defaults must find them.
    return TapConfig.from_preset(
        "tap-tiny",
        image_size=128,
        patch_size=16,  # the release's neck is the identity pyramid level only for 16-pixel patches
        vision_num_cross_blocks=4,  # the release always has 4 (after blocks depth/4 - 1, ...)
        embed_dim=64,
        decoder_num_attention_heads=2,
        decoder_mlp_dim=48,
        iou_head_hidden_dim=40,
        concept_hidden_size=24,
        concept_embed_dim=16,
        concept_names=CONCEPTS,
        concept_logit_scale=LOGIT_SCALE,
        text_hidden_size=64,
        text_num_attention_heads=1,
        text_num_hidden_layers=2,
        text_vocab_size=len(tiny_tap_tokenizer()),
        vision_layer_norm_eps=1e-5,
        text_dropout=0.1,
    )


# ----------------------------------------------------------------------------------------------------------------
# The inverse mapping: our names -> tokenize-anything names (written independently of the converter)


def _predictor(prefix: str, rest: str, depth: int) -> str:
    module, kind = rest.rsplit(".", 1)
    layer = {"proj_in": 0, "proj_out": depth - 1}.get(module)
    if layer is None:
        layer = int(module.split(".")[1]) + 1
    return f"{prefix}.layers.{layer}.{kind}"


def _original_key(key: str, config: TapConfig) -> str:
    rules = [
        (r"vision_encoder\.patch_embed\.(.*)", r"image_encoder.patch_embed.proj.\1"),
        (r"vision_encoder\.position_embeddings", "image_encoder.pos_embed.weight"),
        (r"vision_encoder\.layers\.(.*)", r"image_encoder.blocks.\1"),
        (r"vision_encoder\.cross_blocks\.(.*)", r"image_encoder.cross_conv.\1"),
        (r"vision_encoder\.norm\.(.*)", r"image_encoder.norm.\1"),
        (r"vision_encoder\.neck\.conv1\.(.*)", r"image_encoder.neck.lateral_conv.0.0.\1"),
        (r"vision_encoder\.neck\.norm1\.(.*)", r"image_encoder.neck.lateral_conv.0.1.\1"),
        (r"vision_encoder\.neck\.conv2\.(.*)", r"image_encoder.neck.output_conv.0.0.\1"),
        (r"vision_encoder\.neck\.norm2\.(.*)", r"image_encoder.neck.output_conv.0.1.\1"),
        (
            r"image_decoder\.transformer\.layers\.(\d+)\.layer_norm(\d)\.(.*)",
            r"image_decoder.transformer.blocks.\1.norm\2.\3",
        ),
        (
            r"image_decoder\.transformer\.layers\.(\d+)\.mlp\.lin(\d)\.(.*)",
            r"image_decoder.transformer.blocks.\1.mlp.fc\2.\3",
        ),
        (
            r"image_decoder\.transformer\.layers\.(\d+)\.(\w+)\.out_proj\.(.*)",
            r"image_decoder.transformer.blocks.\1.\2.proj.\3",
        ),
        (r"image_decoder\.transformer\.layers\.(.*)", r"image_decoder.transformer.blocks.\1"),
        (
            r"image_decoder\.transformer\.final_attn_token_to_image\.out_proj\.(.*)",
            r"image_decoder.transformer.final_attn_token_to_image.proj.\1",
        ),
        (r"image_decoder\.transformer\.layer_norm_final_attn\.(.*)", r"image_decoder.transformer.norm.\1"),
        (r"image_decoder\.semantic_tokens\.weight", "image_decoder.sem_tokens.weight"),
        (r"image_decoder\.upscale_conv1\.(.*)", r"image_decoder.output_conv.0.\1"),
        (r"image_decoder\.upscale_layer_norm\.(.*)", r"image_decoder.output_conv.1.\1"),
        (r"image_decoder\.upscale_conv2\.(.*)", r"image_decoder.output_conv.3.\1"),
        (r"text_decoder\.prefix_projection\.weight", "text_decoder.encoder.weight"),
        (r"text_decoder\.embed_tokens\.weight", "text_decoder.transformer.tok_embeddings.weight"),
        (r"text_decoder\.layers\.(.*)", r"text_decoder.transformer.blocks.\1"),
        (r"text_decoder\.norm\.(.*)", r"text_decoder.transformer.norm.\1"),
        (r"text_decoder\.lm_head\.weight", "text_decoder.transformer.text_proj.weight"),
    ]
    match = re.fullmatch(r"image_decoder\.mask_hypernetworks\.(\d+)\.(.*)", key)
    if match:
        return _predictor(f"image_decoder.mask_pred.{match.group(1)}", match.group(2), 3)
    if key.startswith("image_decoder.iou_head."):
        return _predictor("image_decoder.iou_pred", key[len("image_decoder.iou_head.") :], config.iou_head_depth)
    if key.startswith("concept_head.projection."):
        return _predictor("image_decoder.sem_pred", key[len("concept_head.projection.") :], 3)
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return key  # prompt_encoder.*, image_decoder.{iou_token,mask_tokens}.weight keep their names


def released_weights(model: TapModel) -> dict[str, np.ndarray]:
    """The model's state dict under v1.1 names as numpy arrays, as `tap_vit_*_v1_1.pkl` holds it (no concept bank:
    the release keeps it in `concepts/*.pkl`)."""
    weights = {"pixel_mean": BGR_MEAN.copy(), "pixel_rsig": (1.0 / BGR_STD).astype(np.float32)}
    for key, tensor in model.state_dict().items():
        if key == "concept_head.concept_embeddings":
            continue
        array = tensor.detach().numpy().copy()
        if key == "vision_encoder.patch_embed.weight":
            array = array[:, ::-1].copy()  # the release reads BGR images
        weights[_original_key(key, model.config)] = array
    return weights


def released_concepts(model: TapModel) -> list:
    bank = model.concept_head.concept_embeddings.detach()
    return [(bank / bank.norm(dim=-1, keepdim=True)).T.numpy() * LOGIT_SCALE, list(CONCEPTS)]


def _randomize(model: TapModel) -> TapModel:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or name.endswith("coord_matrix"):
                continue
            values = torch.randn(tensor.shape, generator=generator) * 0.3
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)
    return model.eval()


def _dump(obj, path: Path, protocol: int = 4) -> Path:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def source_model() -> TapModel:
    torch.manual_seed(0)
    return _randomize(TapModel(_source_config()))


@pytest.fixture(scope="module")
def release(source_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release")
    _dump(released_weights(source_model), folder / "tap_vit_t_v1_1.pkl")
    _dump(released_concepts(source_model), folder / "concepts.pkl")
    tokenizer_dir = folder / "tokenizer"
    tiny_tap_tokenizer().save_pretrained(tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> tuple[Path, list[str]]:
    destination = tmp_path_factory.mktemp("out") / "tap-converted"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_tap_checkpoint(
            release / "tap_vit_t_v1_1.pkl",
            destination,
            concepts=release / "concepts.pkl",
            tokenizer=release / "tokenizer",
            text_max_length=16,  # the tiny preset's; the release's 40 is the default
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, TapConversionWarning)]
    return destination, messages


def _prompts(model: TapModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    size = model.config.image_size
    return {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "input_points": torch.tensor([[[[10.0, 12.0], [0.0, 0.0]]], [[[40.0, 33.0], [50.0, 20.0]]]]),
        "input_labels": torch.tensor([[[1, 4]], [[1, 0]]]),
        "input_boxes": None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Round trip


def test_converted_model_reproduces_source_outputs(source_model, converted):
    destination, _ = converted
    model = AutoModelForMaskGeneration.from_pretrained(destination).eval()
    assert isinstance(model, TapModel)
    inputs = _prompts(source_model)
    boxes = {
        **inputs,
        "input_points": None,
        "input_labels": None,
        "input_boxes": torch.tensor([[[4.0, 6.0, 30.0, 40.0]]] * 2),
    }
    with torch.no_grad():
        for call in (inputs, boxes):
            expected, got = source_model(**call), model(**call)
            for name in ("pred_masks", "iou_scores", "semantic_tokens", "semantic_embeddings", "image_embeddings"):
                assert torch.equal(getattr(expected, name), getattr(got, name)), name
            assert torch.equal(expected.mask_index, got.mask_index)
            # The bank is re-normalized from the pickle's columns: equal up to float rounding.
            torch.testing.assert_close(got.concept_logits, expected.concept_logits, rtol=1e-5, atol=1e-4)
        tokens = expected.selected_semantic_tokens
        assert torch.equal(source_model.generate_captions(tokens), model.generate_captions(tokens))
        ids = torch.tensor([[1, 5, 6, 7]])
        assert torch.equal(source_model.text_decoder(ids, tokens[:1, 0])[0], model.text_decoder(ids, tokens[:1, 0])[0])
    assert model.concept_names == CONCEPTS
    assert model.config.concept_logit_scale == pytest.approx(LOGIT_SCALE, rel=1e-6)
    assert model.config.vision_layer_norm_eps == 1e-5 and model.config.text_dropout == 0.1


def test_converted_folder_has_processor_with_release_normalization(source_model, converted):
    destination, _ = converted
    files = {path.name for path in destination.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= files
    processor = AutoProcessor.from_pretrained(destination)
    image_processor = processor.image_processor
    # BGR (103.53, 116.28, 123.675) / (57.375, 57.12, 58.395) on 0..255 = ImageNet's RGB constants on 0..1.
    np.testing.assert_allclose(image_processor.image_mean, [0.485, 0.456, 0.406], atol=1e-6)
    np.testing.assert_allclose(image_processor.image_std, [0.229, 0.224, 0.225], atol=1e-6)
    assert image_processor.size["longest_edge"] == source_model.config.image_size
    assert processor.tokenizer.eos_token_id == source_model.config.eos_token_id
    # A BGR image through the released patch embedding == the RGB image through the converted one.
    released = torch.from_numpy(released_weights(source_model)["image_encoder.patch_embed.proj.weight"])
    rgb = torch.randn(1, 3, 16, 16)
    converted_weight = AutoModelForMaskGeneration.from_pretrained(destination).vision_encoder.patch_embed.weight
    torch.testing.assert_close(
        torch.nn.functional.conv2d(rgb.flip(1), released), torch.nn.functional.conv2d(rgb, converted_weight.detach())
    )


def test_conversion_warns_about_v2_differences(converted):
    _, messages = converted
    assert len(messages) == 1 and "BGR" in messages[0] and "eps 1e-6" in messages[0]


def test_release_folder_with_derived_buffers_and_placeholders(source_model, tmp_path):
    weights = released_weights(source_model)
    stripped = {k: v for k, v in weights.items() if not k.endswith(("num_batches_tracked", "rel_pos_embed.index"))}
    assert len(stripped) < len(weights)
    # A downloaded BAAI/tokenize-anything folder: the v1_1 file is picked over v1_0, which would not even load.
    (tmp_path / "release" / "models").mkdir(parents=True)
    _dump(stripped, tmp_path / "release" / "models" / "tap_vit_t_v1_1.pkl")
    (tmp_path / "release" / "models" / "tap_vit_t_v1_0.pkl").write_bytes(b"not a pickle")
    with pytest.warns(TapConversionWarning) as record:
        convert_tap_checkpoint(tmp_path / "release", tmp_path / "out")
    text = " ".join(str(w.message) for w in record)
    assert "derived" in text and "placeholder" in text and "only the image processor" in text
    model = TapModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**_prompts(model)).pred_masks, source_model(**_prompts(model)).pred_masks)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    _dump(stripped, tmp_path / "release" / "models" / "tap_vit_u_v1_1.pkl")
    with pytest.raises(ValueError, match=r"exactly one tap_vit_\*\.pkl .*tap_vit_u_v1_1\.pkl"):
        convert_tap_checkpoint(tmp_path / "release", tmp_path / "out2")


# ----------------------------------------------------------------------------------------------------------------
# Sizes


def _meta_release(preset: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = TapModel(TapConfig.from_preset(preset))
    state = model.state_dict()
    state.pop("concept_head.concept_embeddings")  # the release keeps the bank in concepts/*.pkl
    return {_original_key(key, model.config): tensor for key, tensor in state.items()}


def test_paper_size_is_inferred_and_fully_mapped():
    weights = _meta_release("tap-vit-b")
    assert infer_tap_model_type(weights) == "vit-b"
    config = tap_config_from_weights(weights)
    preset = TapConfig.from_preset("tap-vit-b")
    for field in (
        "vision_hidden_size",
        "vision_num_hidden_layers",
        "decoder_num_attention_heads",
        "decoder_mlp_dim",
        "text_num_attention_heads",
        "text_vocab_size",
        "concept_embed_dim",
        "iou_head_hidden_dim",
    ):
        assert getattr(config, field) == getattr(preset, field), field
    converted = convert_tap_state_dict(weights, config)
    with torch.device("meta"):
        expected = TapModel(config).state_dict()
    assert list(converted) == list(expected)
    assert all(converted[key].shape == expected[key].shape for key in expected)
    with pytest.raises(ValueError, match=r"`model_type` is 'vit-h' but the weights have the shapes of vit-b"):
        tap_config_from_weights(weights, model_type="tap_vit_h")


# ----------------------------------------------------------------------------------------------------------------
# Refused pickles


class _RunsShell:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _Evaluates:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.sentinel)!r}, 'w').close()",))


class _Spawns:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.sentinel)],))


@pytest.mark.parametrize(
    ("payload", "refused"),
    [(_RunsShell, r"`(posix|os)\.system`"), (_Evaluates, r"`builtins\.eval`"), (_Spawns, r"`subprocess\.Popen`")],
)
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, payload, refused):
    sentinel = tmp_path / "pwned"
    source = _dump({"pixel_mean": BGR_MEAN, "image_encoder.norm.weight": payload(sentinel)}, tmp_path / "evil.pkl")
    with pytest.raises(UnsafePickleError, match=refused + r".*not a plain weights pickle"):
        restricted_load_pickle(source)
    with pytest.raises(pickle.UnpicklingError):
        convert_tap_checkpoint(source, tmp_path / "out")
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_torch_tensors_object_arrays_and_sets_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match=r"`torch\._utils\._rebuild_tensor_v2`"):
        restricted_load_pickle(_dump({"w": torch.zeros(2)}, tmp_path / "torch.pkl"))
    with pytest.raises(UnsafePickleError, match=r"`root\['w'\]` is a numpy array of dtype object"):
        restricted_load_pickle(_dump({"w": np.array([1, "a"], dtype=object)}, tmp_path / "object.pkl"))
    with pytest.raises(UnsafePickleError, match=r"`root\['w'\]` is a set"):
        restricted_load_pickle(_dump({"w": {1, 2}}, tmp_path / "set.pkl"))
    with pytest.raises(ValueError, match=r"entry 'w' is list"):
        load_tap_weights(_dump({"w": [1.0, 2.0]}, tmp_path / "list.pkl"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_arrays_load_under_every_pickle_protocol(tmp_path, protocol):
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array([3, -1], dtype=np.int64)}
    loaded = restricted_load_pickle(
        _dump({**arrays, "meta": [1, 2.5, "x", (np.float32(2.0),)]}, tmp_path / "w.pkl", protocol)
    )
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype and np.array_equal(loaded[key], array)
    assert loaded["meta"] == [1, 2.5, "x", (2.0,)]


# ----------------------------------------------------------------------------------------------------------------
# Bad checkpoints


def test_missing_and_unknown_keys_fail_before_writing(source_model, tmp_path):
    weights = released_weights(source_model)
    missing = {k: v for k, v in weights.items() if k != "image_decoder.transformer.blocks.1.norm3.bias"}
    with pytest.raises(ValueError, match=r"lacks 1 weights.*image_decoder\.transformer\.layers\.1\.layer_norm3\.bias"):
        convert_tap_checkpoint(_dump(missing, tmp_path / "missing.pkl"), tmp_path / "out")
    unknown = {**weights, "image_encoder.neck.input_conv.0.0.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(
        ValueError, match=r"not part of the TAP v1\.x layout.*image_encoder\.neck\.input_conv\.0\.0\.weight"
    ):
        convert_tap_checkpoint(_dump(unknown, tmp_path / "unknown.pkl"), tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["missing.pkl", "unknown.pkl"]


def test_bad_concept_bank_and_existing_destination(source_model, release, tmp_path):
    weights, names = released_concepts(source_model)
    uneven = weights.copy()
    uneven[:, 0] *= 2
    with pytest.raises(ValueError, match=r"norms from .* cannot be expressed"):
        load_tap_concepts(_dump([uneven, names], tmp_path / "uneven.pkl"))
    with pytest.raises(ValueError, match=r"5 concept columns but 4 names"):
        load_tap_concepts(_dump([weights, names[:4]], tmp_path / "names.pkl"))
    bank, loaded_names, scale = load_tap_concepts(_dump([weights, names], tmp_path / "ok.pkl"))
    assert loaded_names == CONCEPTS and scale == pytest.approx(LOGIT_SCALE) and bank.shape == (5, 16)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`destination` .* already exists"):
        convert_tap_checkpoint(release / "tap_vit_t_v1_1.pkl", tmp_path / "taken")
