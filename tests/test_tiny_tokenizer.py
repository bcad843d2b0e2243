"""The offline word-level tokenizer behaves like a transformers tokenizer and survives save/load."""

import pytest
from transformers import AutoTokenizer

from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer


def test_ids_specials_and_round_trip(tmp_path):
    tokenizer = build_word_tokenizer(["a", "red", "circle", "."], ["<p>", "</p>", "<r0>"])
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == [
        0,
        1,
        2,
        3,
    ]
    ids = tokenizer("<p>A red circle</p>.<r0>").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "<p>", "a", "red", "circle", "</p>", ".", "<r0>"]
    assert tokenizer("blue circle", add_special_tokens=False).input_ids == [0, 6]
    assert len(tokenizer) == 4 + 4 + 3
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("<p>A red circle</p>.<r0>").input_ids == ids
    assert reloaded.decode(ids, skip_special_tokens=True) == "a red circle ."


def test_bad_vocabulary_is_rejected():
    with pytest.raises(TypeError, match="`words`"):
        build_word_tokenizer("a red circle")
    with pytest.raises(ValueError, match="without spaces"):
        build_word_tokenizer(["red circle"])
    with pytest.raises(ValueError, match="`padding_side`"):
        build_word_tokenizer(["a"], padding_side="middle")
