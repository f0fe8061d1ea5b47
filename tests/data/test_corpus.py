import json

import numpy as np
import pytest

from longrange.data.corpus import builtin_corpus, is_validation, load_corpus
from longrange.data.samplers import DocumentChunks, RandomWindows, eval_chunks


def test_builtin_corpus_split_is_stable_and_excludes_tests():
    a, b = builtin_corpus(), builtin_corpus()
    assert [d.name for d in a.train] == [d.name for d in b.train]
    assert [d.name for d in a.val] == [d.name for d in b.val]
    names = [d.name for d in a.train + a.val]
    assert names == sorted(names) or [d.name for d in a.train] == sorted(d.name for d in a.train)
    assert not any("/test/" in f"/{n}" or "/tests/" in f"/{n}" for n in names)
    assert len(a.val) > 0 and len(a.train) > 10 * len(a.val)
    # The split is a function of the name alone.
    assert all(is_validation(d.name, 0.05) for d in a.val)
    assert not any(is_validation(d.name, 0.05) for d in a.train)


def test_folder_split_does_not_depend_on_other_files(text_folder):
    before = {d.name for d in load_corpus(text_folder).val}
    (text_folder / "extra.py").write_text("x = 1\n" * 50)
    after = {d.name for d in load_corpus(text_folder).val}
    assert before <= after | {"extra.py"}
    assert before - {"extra.py"} == after - {"extra.py"}


def test_jsonl_and_text_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(30)))
    corpus = load_corpus(path)
    assert len(corpus.train) + len(corpus.val) == 30
    text = tmp_path / "book.txt"
    text.write_text("abcdefghij" * 100)
    corpus = load_corpus(text)
    assert len(corpus.train[0]) + len(corpus.val[0]) == 1000


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(tmp_path / "missing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_corpus(bad)


def test_random_windows_depend_only_on_index():
    stream = np.arange(1000, dtype=np.uint8)
    s1 = RandomWindows(stream, seq_len=16, batch_size=4, seed=3)
    s2 = RandomWindows(stream, seq_len=16, batch_size=4, seed=3)
    assert s1.batch(7).equal(s2.batch(7))
    assert not s1.batch(7).equal(s1.batch(8))
    assert s1.batch(0).shape == (4, 17)


def test_document_chunks_walk_documents_in_order(text_folder):
    corpus = load_corpus(text_folder)
    sampler = DocumentChunks(corpus.train, seq_len=64, batch_size=2, seed=0)
    first = sampler.next()
    assert first.new_doc.all()
    doc = sampler._doc_for(0, 0)
    expected = np.asarray(doc.tokens[:65], dtype=np.int64)
    assert first.inputs[0].tolist() == expected[:-1].tolist()
    assert first.targets[0].tolist() == expected[1:].tolist()
    second = sampler.next()
    assert not second.new_doc[0]
    assert second.inputs[0, 0] == doc.tokens[64]
    state = sampler.state()
    a = sampler.next()
    sampler.load_state(state)
    b = sampler.next()
    assert a.inputs.equal(b.inputs)


def test_eval_chunks_predict_every_token_once(text_folder):
    docs = load_corpus(text_folder).val
    total = sum(t.numel() for _, _, t in eval_chunks(docs, 50))
    assert total == sum(len(d) - 1 for d in docs)
    capped = sum(t.numel() for _, _, t in eval_chunks(docs, 50, max_tokens=123))
    assert capped == 123


def test_a_binary_file_is_refused_like_a_binary_file_in_a_folder(tmp_path):
    blob = tmp_path / "program"
    blob.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"program looks binary \(it holds NUL bytes\)"):
        load_corpus(blob)


def test_jsonl_encoding_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_corpus(bad)
    bad.write_text('{"text": "ok"}\n\n{"text": "\\ud800"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: the text holds an unpaired surrogate"):
        load_corpus(bad)


def test_validation_problem_says_why_there_is_nothing_to_validate(tmp_path, text_folder):
    assert load_corpus(text_folder).validation_problem() is None
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single document " * 10}) + "\n")
    assert "holds 1 document and none is held out" in load_corpus(one).validation_problem()
