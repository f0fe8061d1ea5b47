import pytest
import torch

from longrange.data.tokenizer import ByteTokenizer


@pytest.mark.parametrize(
    "text",
    ["", "def f():\n    return 1", "héllo wörld ✓ 漢字", "\x00\xff"],
    ids=["empty", "ascii", "unicode", "edges"],
)
def test_round_trip_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.int64
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_all_bytes():
    tok = ByteTokenizer()
    data = bytes(range(256)) * 3
    assert tok.decode_bytes(tok.encode(data)) == data


def test_invalid_utf8_is_replaced_for_people():
    tok = ByteTokenizer()
    ids = torch.tensor([0x66, 0xFF, 0x6F])
    assert tok.decode(ids) == "f\ufffdo"
    assert tok.decode_bytes(ids) == b"f\xffo"


def test_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="str or bytes"):
        tok.encode(123)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode_bytes([300])
