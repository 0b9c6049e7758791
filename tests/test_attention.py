import pytest
import torch

from dlm.models.attention import PATTERNS, attention_mask, attention_mask_reference

DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 7, 7, 7, 7, 7]])


def _cases():
    for pattern in PATTERNS:
        for with_docs in (False, True):
            for block_size in (1, 3, 4, 10, 16) if pattern == "block_causal" else (None,):
                yield pattern, with_docs, block_size


@pytest.mark.parametrize("pattern,with_docs,block_size", list(_cases()))
def test_vectorised_matches_reference(pattern, with_docs, block_size):
    doc_ids = DOC_IDS if with_docs else None
    got = attention_mask(pattern, 10, doc_ids=doc_ids, block_size=block_size)
    want = attention_mask_reference(pattern, 10, doc_ids=doc_ids, block_size=block_size)
    if want is None:
        assert got is None
        return
    assert got.dtype == torch.bool
    assert got.shape == want.shape == ((2, 1, 10, 10) if with_docs else (1, 1, 10, 10))
    assert torch.equal(got, want)


def test_plain_bidirectional_is_none():
    assert attention_mask("bidirectional", 8) is None


def test_block_causal_shape_example():
    m = attention_mask("block_causal", 4, block_size=2)[0, 0]
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


def test_every_query_sees_itself():
    for pattern in PATTERNS:
        m = attention_mask(pattern, 10, doc_ids=DOC_IDS, block_size=3)
        assert m.diagonal(dim1=-2, dim2=-1).all()


def test_unknown_pattern_lists_valid_ones():
    with pytest.raises(ValueError, match="causal, bidirectional, block_causal"):
        attention_mask("sliding", 8)


@pytest.mark.parametrize("block_size", [None, 0])
def test_block_causal_needs_block_size(block_size):
    with pytest.raises(ValueError, match="block_size"):
        attention_mask("block_causal", 8, block_size=block_size)


def test_doc_ids_shape_checked():
    with pytest.raises(ValueError, match="doc_ids"):
        attention_mask("causal", 8, doc_ids=torch.zeros(2, 7, dtype=torch.long))


def test_implementation_mask_sdpa_keeps_the_boolean_and_eager_gets_an_additive_mask():
    from dlm.models.attention import implementation_mask

    allowed = torch.tensor([[True, False]])
    assert implementation_mask(allowed, "sdpa", torch.bfloat16) is allowed
    additive = implementation_mask(allowed, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0] == 0 and additive[0, 1] == torch.finfo(torch.bfloat16).min
    assert implementation_mask(allowed, "eager", torch.int64).dtype == torch.float32  # non-float weights
