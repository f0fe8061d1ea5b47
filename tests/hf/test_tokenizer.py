"""The byte tokenizer for transformers: longrange's ids, exactly; AutoTokenizer from a directory."""

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'longrange[hf]')")

from transformers import AutoTokenizer

import longrange.hf as lh
from longrange.data.tokenizer import ByteTokenizer

TEXTS = ["def f(x):\n    return x  # ok\n", "naïve café, 日本語 ✓", " spaces  . , ! ?  ", "tab\there\r\nline"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_longrange_bytes_and_decode_inverts(text):
    tok = lh.LongRangeByteTokenizer()
    ids = tok(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text).tolist()  # no special tokens added around
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_vocabulary_and_special_tokens():
    tok = lh.LongRangeByteTokenizer()
    assert tok.vocab_size == len(tok) == 256
    assert tok.get_vocab() == {chr(i): i for i in range(256)}
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 0, None, None)
    assert tok.padding_side == "right"
    assert tok("a\x00b")["input_ids"] == [97, 0, 98]
    assert tok.decode([97, 0, 98], skip_special_tokens=True) == "ab"
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"] == [[97, 98, 0, 0], [97, 98, 99, 100]]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert tok.decode([0xC3]) == "\ufffd"  # invalid UTF-8 reads as U+FFFD, as longrange's decode
    with pytest.raises(ValueError, match="one byte"):
        lh.LongRangeByteTokenizer(eos_token="</s>")


def test_auto_tokenizer_loads_a_saved_tokenizer(tmp_path):
    lh.LongRangeByteTokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "longrange_vanilla", "family": "vanilla"}')
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, lh.LongRangeByteTokenizer)
    assert tok(TEXTS[1])["input_ids"] == ByteTokenizer().encode(TEXTS[1]).tolist()
    assert tok.eos_token_id == 0
