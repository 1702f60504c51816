"""Packed rows: several documents in one row, each attended to and positioned on its own
(`document_ids`), score exactly as the documents run one at a time: logits, loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smollm import ModelConfig, SmolLM
from smollm.model import KVCache, document_mask, document_starts

VOCAB = 300


def tiny() -> SmolLM:
    torch.manual_seed(0)
    return SmolLM(ModelConfig.from_name("tiny", vocab_size=VOCAB))


def documents(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Documents of token ids, each (1, n + 1): n inputs and their n shifted targets."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, n + 1), generator=g) for n in lengths]


def pack(docs: list[torch.Tensor], masks: list[torch.Tensor], length: int):
    """One packed row of `length` inputs: the documents' inputs, their targets and loss masks side
    by side, ids 0, 1, ... per document, then padding (an id of its own, no loss)."""
    inputs = torch.cat([d[:, :-1] for d in docs], 1)
    targets = torch.cat([d[:, 1:] for d in docs], 1)
    mask = torch.cat(masks, 1)
    ids = torch.cat([torch.full((1, d.shape[1] - 1), i) for i, d in enumerate(docs)], 1)
    pad = length - inputs.shape[1]
    assert pad >= 0
    inputs = F.pad(inputs, (0, pad), value=7)  # any token: it must change nothing
    targets = F.pad(targets, (0, pad), value=7)
    mask = F.pad(mask, (0, pad), value=False)
    ids = F.pad(ids, (0, pad), value=len(docs))
    return inputs, targets, mask, ids


def one_at_a_time(model: SmolLM, docs, masks) -> torch.Tensor:
    """The token-weighted mean over the documents' scored tokens, each document run alone: its
    summed cross entropy over its masked-in tokens, all summed, over their count."""
    total = sum(F.cross_entropy(model(d[:, :-1])[m], d[:, 1:][m], reduction="sum") for d, m in zip(docs, masks))
    return total / sum(int(m.sum()) for m in masks)


def grads(model: SmolLM) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("scored", ["all", "replies"])
def test_a_packed_batch_scores_as_its_documents_one_at_a_time(scored):
    """Two rows of 24: documents of 5, 9, 3 and 7 tokens (the last row padded) give each document's
    own logits, and the loss and every parameter's gradient of the documents run one at a time."""
    model = tiny()
    lengths = [[5, 9, 3, 7], [11, 6]]
    rows = [documents(n, seed=i) for i, n in enumerate(lengths)]
    all_docs = [d for row in rows for d in row]
    if scored == "all":
        masks = [torch.ones(1, d.shape[1] - 1, dtype=torch.bool) for d in all_docs]
    else:  # a prompt of a few tokens, then a reply scored (a conversation's loss mask)
        masks = [torch.arange(d.shape[1] - 1)[None] >= min(3, d.shape[1] - 2) for d in all_docs]
    packed = [pack(row, masks[sum(map(len, rows[:i])):][:len(row)], 24) for i, row in enumerate(rows)]
    inputs, targets, mask, ids = (torch.cat(parts, 0) for parts in zip(*packed))  # (2, 24) each

    with torch.no_grad():  # each document's logits, wherever it sits in its row
        logits = model(inputs, document_ids=ids)
        for b, row in enumerate(rows):
            start = 0
            for d in row:
                n = d.shape[1] - 1
                torch.testing.assert_close(logits[b, start:start + n], model(d[:, :-1])[0], rtol=0, atol=1e-5)
                start += n

    loss = model.loss(inputs, targets, mask, document_ids=ids, chunk_size=5)
    loss.backward()
    packed_grads = grads(model)
    ref = one_at_a_time(model, all_docs, masks)
    ref.backward()
    ref_grads = grads(model)
    assert abs(loss.item() - ref.item()) < 1e-5
    for name, g in ref_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_positions_restart_and_attention_stays_within_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5, 5, 9]])
    starts = document_starts(ids)
    assert (torch.arange(8) - starts).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]
    mask = document_mask(starts)
    assert mask.shape == (2, 1, 8, 8)
    same = ids[:, :, None] == ids[:, None, :]
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 0], same & causal)
    # RoPE: a document's second token sits at position 1 wherever the document starts, so a
    # document's logits are the same at the row's start and after another document.
    model = tiny().eval()
    doc = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(4))
    row = torch.cat([other, doc], 1)
    with torch.no_grad():
        packed = model(row, document_ids=torch.tensor([[0] * 4 + [1] * 6]))[:, 4:]
        shifted = model(row)[:, 4:]  # without document_ids the document sees `other` at positions 4..9
    torch.testing.assert_close(packed, model(doc).detach(), rtol=0, atol=1e-5)
    assert (shifted - packed).abs().max() > 1e-2


def test_padding_carries_no_loss_and_changes_nothing():
    model = tiny()
    docs = documents([6, 8])
    masks = [torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool)]
    inputs, targets, mask, ids = pack(docs, masks, 20)
    loss = model.loss(inputs, targets, mask, document_ids=ids)
    loss.backward()
    first = grads(model)
    other_inputs, other_targets = inputs.clone(), targets.clone()
    other_inputs[:, 14:] = 123  # other padding tokens, other targets under it
    other_targets[:, 14:] = 45
    again = model.loss(other_inputs, other_targets, mask, document_ids=ids)
    again.backward()
    assert torch.equal(loss, again)
    assert all(torch.equal(g, p) for g, p in zip(first.values(), grads(model).values()))
    assert abs(loss.item() - one_at_a_time(model, docs, masks).item()) < 1e-5


def test_one_document_per_row_is_the_plain_path():
    """All-zero document_ids (one document a row) compute what no document_ids do: the mask is
    the causal one and the positions are 0..T-1."""
    model = tiny()
    x = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x, document_ids=zeros), model(x), rtol=1e-5, atol=1e-5)
    loss = model.loss(x, targets, document_ids=zeros)
    loss.backward()
    with_ids = grads(model)
    plain = model.loss(x, targets)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for name, g in grads(model).items():
        torch.testing.assert_close(with_ids[name], g, rtol=1e-4, atol=1e-6, msg=name)


@torch.no_grad()
def test_flex_attention_scores_as_the_sdpa_mask():
    """The flex_attention option (a BlockMask; forward only on CPU) gives the SDPA mask's logits."""
    model = tiny().eval()
    x = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 37])
    sdpa = model(x, document_ids=ids)
    model.document_attention = "flex"
    torch.testing.assert_close(model(x, document_ids=ids), sdpa, rtol=1e-5, atol=1e-5)


def test_document_ids_are_checked_and_not_for_decoding():
    model = tiny()
    x = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(x, document_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="decoding with a KVCache takes none"):
        model(x, KVCache(model.config, 1, 8), document_ids=torch.zeros_like(x))
