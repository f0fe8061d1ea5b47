"""memorizing's reference-named class: ``MemorizingTransformer`` keeps the reference's keywords,
calling convention and memory directory, and equals memorizing-transformers-pytorch after
weight conversion (over several chunks; with XL memories on the first chunk)."""

import tempfile

import pytest
import torch

from longrange.models.memorizing import KNNMemoryList, MemorizingConfig, MemorizingLM, MemorizingTransformer
from longrange.models.reference_init import init_mismatches
from longrange.testing import assert_close, import_reference

VOCAB, CHUNK = 32, 16


def _model(**overrides):
    settings = dict(
        vocab_size=VOCAB,
        dim=32,
        depth=2,
        heads=2,
        max_seq_len=CHUNK,
        max_knn_memories=64,
        num_retrieved_memories=4,
        knn_backend="exact",
        memorizing_layers=(1, 2),
    )
    settings.update(overrides)
    return MemorizingLM(MemorizingConfig(**settings)).eval()


def _tokens(batch, n, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("no_knn_files_left")


def test_keywords_batch_size_and_pad_id():
    with pytest.raises(TypeError, match="unknown keyword"):
        MemorizingTransformer(num_tokens=VOCAB, dim=32, depth=2, knn_heads=2)
    with pytest.raises(TypeError, match="num_tokens"):
        MemorizingTransformer(dim=32, depth=2)
    compat = MemorizingTransformer(
        num_tokens=VOCAB, dim=32, depth=2, heads=2, dim_head=16, max_knn_memories=32
    )
    with pytest.raises(ValueError, match="not both"):
        MemorizingTransformer(compat.config, dim=32)
    with (
        compat.knn_memories_context(batch_size=2) as memories,
        pytest.raises(ValueError, match="batch size 1"),
    ):
        compat(_tokens(1, 8), memories)
    compat = MemorizingTransformer(
        num_tokens=VOCAB, dim=32, depth=1, dim_head=16, heads=2, pad_id=7, max_knn_memories=16
    )
    assert compat.memorizing_layers == ()  # the reference's default (depth // 2,) for depth 1
    labels = _tokens(1, 8)
    labels[0, :4] = 7
    with compat.knn_memories_context(batch_size=1) as memories:
        loss = compat(_tokens(1, 8), memories, labels=labels)
        logits = compat(_tokens(1, 8), memories)
    kept = labels[0] != 7
    assert_close(loss, torch.nn.functional.cross_entropy(logits[0, kept], labels[0, kept]), 1e-6)


def test_reference_interface_and_memory_directory(tmp_path):
    model = MemorizingTransformer(
        num_tokens=VOCAB,
        dim=32,
        depth=3,
        heads=2,
        dim_head=16,
        max_knn_memories=32,
        num_retrieved_memories=4,
        xl_max_memories=5,
        xl_memory_layers=(2, 3),
        knn_memories_directory=str(tmp_path / "mem"),
        knn_backend="faiss",
    )
    assert model.memorizing_layers == (1,) and model.num_xl_memory_layers == 2
    x = _tokens(2, 12, seed=10)
    with model.knn_memories_context(batch_size=2) as memories:
        assert isinstance(memories, KNNMemoryList) and len(memories) == 1
        assert memories[0].path.parent.parent == (tmp_path / "mem").resolve()
        logits, xl = model(x, memories)
        assert logits.shape == (2, 12, VOCAB) and [t.shape for t in xl] == [(2, 5, 2, 16)] * 2
        loss, xl = model(x, memories, xl_memories=xl, labels=x)
        assert loss.ndim == 0 and memories[0].db_offsets.tolist() == [24, 24]
        model(x, memories, xl_memories=xl, add_knn_memory=False)
        assert memories[0].db_offsets.tolist() == [24, 24]
    assert list((tmp_path / "mem").iterdir()) == []


def test_reference_parity():
    """Copied weights + an exact index in the reference: equal outputs over several chunks
    (no wrap-around, no XL: the reference misaligns its relative bias once XL memories exist)."""
    ref_module = import_reference("memorizing_transformers_pytorch.memorizing_transformers_pytorch")
    knn_module = import_reference("memorizing_transformers_pytorch.knn_memory")
    from longrange.convert import load_reference

    faiss = knn_module.faiss

    class ExactFaiss:  # the reference's HNSW index, swapped for an exact one
        def __getattr__(self, name):
            return getattr(faiss, name)

        @staticmethod
        def IndexHNSWFlat(dim, m, metric):
            return faiss.IndexFlatIP(dim)

    kwargs = dict(
        num_tokens=VOCAB,
        dim=32,
        depth=3,
        heads=2,
        dim_head=16,
        max_knn_memories=256,
        num_retrieved_memories=5,
        memorizing_layers=(2, 3),
        ff_mult=2,
    )
    torch.manual_seed(0)
    reference = ref_module.MemorizingTransformer(**kwargs, knn_memories_directory=tempfile.mkdtemp()).eval()
    ours = MemorizingTransformer(**kwargs).eval()
    load_reference(ours, reference.state_dict())
    x = _tokens(2, 4 * CHUNK, seed=11)
    knn_module.faiss = ExactFaiss()
    try:
        with (
            reference.knn_memories_context(batch_size=2) as ref_mem,
            ours.knn_memories_context(batch_size=2) as mem,
        ):
            for i in range(0, 4 * CHUNK, CHUNK):
                chunk = x[:, i : i + CHUNK]
                assert_close(ours(chunk, mem), reference(chunk, ref_mem), 1e-4, name=f"chunk {i // CHUNK}")
            assert_close(ours(chunk, mem, labels=chunk), reference(chunk, ref_mem, labels=chunk), 1e-4)
    finally:
        knn_module.faiss = faiss
        import shutil

        shutil.rmtree(reference.knn_memories_directory, ignore_errors=True)


def test_converter_refuses_a_deeper_reference(tmp_path):
    """A deeper reference's extra layers are an error rather than dropped."""
    ref_module = import_reference("memorizing_transformers_pytorch.memorizing_transformers_pytorch")
    from longrange.convert import load_reference

    kwargs = dict(num_tokens=VOCAB, dim=32, heads=2, dim_head=8, memorizing_layers=(1,))
    reference = ref_module.MemorizingTransformer(**kwargs, depth=3, knn_memories_directory=str(tmp_path))
    with pytest.raises(ValueError, match="reference weights with no place"):
        load_reference(MemorizingTransformer(**kwargs, depth=2), reference.state_dict())


def test_reference_parity_with_xl_on_the_first_chunk():
    ref_module = import_reference("memorizing_transformers_pytorch.memorizing_transformers_pytorch")
    from longrange.convert import load_reference

    kwargs = dict(
        num_tokens=VOCAB,
        dim=32,
        depth=2,
        heads=2,
        dim_head=16,
        max_knn_memories=64,
        num_retrieved_memories=4,
        xl_max_memories=6,
        memorizing_layers=(1,),
    )
    reference = ref_module.MemorizingTransformer(**kwargs, knn_memories_directory=tempfile.mkdtemp()).eval()
    ours = MemorizingTransformer(**kwargs).eval()
    load_reference(ours, reference.state_dict())
    x = _tokens(2, CHUNK, seed=12)
    with (
        reference.knn_memories_context(batch_size=2) as ref_mem,
        ours.knn_memories_context(batch_size=2) as mem,
    ):
        ref_logits, ref_xl = reference(x, ref_mem)
        logits, xl = ours(x, mem)
        assert_close(logits, ref_logits, 1e-4)
        for got, want in zip(xl, ref_xl):
            assert_close(got, want, 1e-5)
        assert mem[0].db_offsets.tolist() == [CHUNK - 6, CHUNK - 6]  # entries that left the XL window
    import shutil

    shutil.rmtree(reference.knn_memories_directory, ignore_errors=True)


def test_reference_interface_passes_reprojected_xl_as_inputs():
    model = MemorizingTransformer(
        num_tokens=VOCAB,
        dim=32,
        depth=2,
        heads=2,
        dim_head=16,
        max_knn_memories=32,
        xl_max_memories=5,
        xl_reproject=True,
        knn_backend="exact",
    )
    x = _tokens(2, 12, seed=54)
    with model.knn_memories_context(batch_size=2) as memories:
        _, xl = model(x, memories)
        assert [t.shape for t in xl] == [(2, 5, 32)] * 2
        model(x, memories, xl_memories=xl)
        with pytest.raises(ValueError, match=r"shape \(2, L, 32\)"):
            model(x, memories, xl_memories=[torch.zeros(2, 5, 2, 16)] * 2)


@pytest.mark.parametrize(
    "options",
    [dict(memorizing_layers=(1,), xl_memory_layers=(2,), xl_max_memories=16), dict(memorizing_layers=(1, 2))],
    ids=["knn-and-xl", "two-knn-layers"],
)
def test_initialises_like_the_reference(options, tmp_path):
    """PyTorch's defaults, as the reference: the token embedding from N(0, 1) (the family's
    ``MemorizingLM`` keeps N(0, 0.02); under the reference's enwik8 script that made the loss
    jump above a uniform guess)."""
    ref_module = import_reference("memorizing_transformers_pytorch")
    kw = dict(num_tokens=256, dim=256, depth=2, dim_head=64, heads=4, max_knn_memories=64)
    kw.update(knn_memories_directory=str(tmp_path), **options)
    assert (
        init_mismatches(lambda: MemorizingTransformer(**kw), lambda: ref_module.MemorizingTransformer(**kw))
        == []
    )
    torch.manual_seed(0)
    native = MemorizingLM(MemorizingConfig(vocab_size=256, dim=256, depth=2, heads=4, memorizing_layers=(1,)))
    assert abs(float(native.embed.weight.detach().std()) - 0.02) < 1e-3
