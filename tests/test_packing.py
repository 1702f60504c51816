"""Packed rows: several documents in one row, each attended to and positioned on its own
(`document_ids`), score exactly as the documents run one at a time: logits, loss and gradients."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from smollm import ModelConfig, SmolLM
from smollm.model import DocumentSpans, KVCache, document_mask, document_starts
from smollm.module import LitSmolLM
from test_data import corpus, make_dm, ready  # noqa: F401  (the small corpus, its data modules)

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


@pytest.mark.parametrize("kind", ["varlen", "sdpa"])
@pytest.mark.parametrize("scored", ["all", "replies"])
def test_a_packed_batch_scores_as_its_documents_one_at_a_time(scored, kind):
    """Two rows of 24: documents of 5, 9, 3 and 7 tokens (the last row padded) give each document's
    own logits, and the loss and every parameter's gradient of the documents run one at a time,
    with per-document attention (varlen, the default) and with the mask (sdpa)."""
    model = tiny()
    model.document_attention = kind
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
    model.document_attention = "sdpa"
    sdpa = model(x, document_ids=ids)
    model.document_attention = "flex"
    torch.testing.assert_close(model(x, document_ids=ids), sdpa, rtol=1e-5, atol=1e-5)


def test_varlen_attention_gives_the_masks_loss_and_gradients():
    """The default per-document attention (causal SDPA over each document's slice on CPU, no pair
    across documents computed) gives the loss and every gradient of SDPA with the block-diagonal
    mask: two rows of several documents, the tiny model's GQA (4 query heads, 2 kv heads)."""
    model = tiny()
    assert model.document_attention == "varlen" and model.config.num_key_value_heads < model.config.num_attention_heads
    x = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(8))
    ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 30 + [2] + [3] * 6])
    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(9)) < 0.7
    results = {}
    for kind in ("varlen", "sdpa"):
        model.document_attention = kind
        loss = model.loss(x[:, :-1], x[:, 1:], mask, document_ids=ids)
        loss.backward()
        results[kind] = loss.item(), grads(model)
    assert results["varlen"][0] == pytest.approx(results["sdpa"][0], abs=1e-6)
    for name, g in results["sdpa"][1].items():
        torch.testing.assert_close(results["varlen"][1][name], g, rtol=0, atol=1e-6, msg=name)


def test_document_spans_are_the_documents_of_the_flattened_batch_read_once_per_forward(monkeypatch):
    """varlen's spans: the documents of the batch read row after row (each row starts one), as
    cu_seqlens; built once per forward for every layer, so the boundaries go to the host once."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5, 5, 9]])
    spans = DocumentSpans(document_starts(ids))
    assert spans.bounds == [0, 3, 5, 6, 8, 15, 16] and spans.max_len == 7
    assert spans.cu_seqlens.dtype == torch.int32 and spans.cu_seqlens.tolist() == spans.bounds

    class Counted(DocumentSpans):
        built = 0

        def __init__(self, starts: torch.Tensor) -> None:
            Counted.built += 1
            super().__init__(starts)

    monkeypatch.setattr("smollm.model.DocumentSpans", Counted)
    model = tiny()
    assert model.config.num_hidden_layers > 1
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 8)), document_ids=ids)
    assert Counted.built == 1


def test_document_ids_are_checked_and_not_for_decoding():
    model = tiny()
    x = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(x, document_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="decoding with a KVCache takes none"):
        model(x, KVCache(model.config, 1, 8), document_ids=torch.zeros_like(x))


# ---- LitSmolLM: the batch contract, and a step's loss over its scored tokens ----

class Kept(LitSmolLM):
    """A LitSmolLM that keeps the gradients the clipping sees (after the step's normalization) and
    the step's loss; with `save_to`, writes them to SAVE_TO.RANK (for processes of its own)."""

    save_to: str | None = None

    def configure_gradient_clipping(self, optimizer, *args, **kw):
        kept = ({n: p.grad.clone() for n, p in self.model.named_parameters()}, self._train_loss.item())
        self.kept.append(kept)
        if self.save_to:
            torch.save(kept, f"{self.save_to}.{self.global_rank}")
        super().configure_gradient_clipping(optimizer, *args, **kw)


def kept_module() -> Kept:
    torch.manual_seed(0)
    module = Kept(preset="tiny", config_overrides={"vocab_size": VOCAB}, grad_clip=0.0)
    module.kept = []
    return module


def contract_batches(n: int, batch: int = 2, length: int = 16, seed: int = 0, masks: bool = True) -> list[dict]:
    """n micro-batches in the batch contract: packed rows whose loss masks keep very different
    numbers of tokens (a handful in one micro-batch, most in another)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(0, VOCAB, (batch, length + 1), generator=g)
        keep = torch.rand(batch, length, generator=g) < (0.15 if k % 2 == 0 else 0.9)
        keep[0, -1] = True  # at least one
        documents = torch.cumsum(torch.rand(batch, length, generator=g) < 0.2, dim=1)
        item = {"input_ids": ids, "document_ids": documents}
        if masks:
            item["loss_mask"] = keep
        out.append(item)
    return out


class RankBatches(L.LightningDataModule):
    """Each process's own micro-batches: rank r trains on per_rank[r]."""

    def __init__(self, per_rank: list[list[dict]]) -> None:
        super().__init__()
        self.per_rank = per_rank

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.per_rank[self.trainer.global_rank], batch_size=None)


def train_one_step(module, batches: list[dict], accumulate: int, processes: int = 1):
    trainer = L.Trainer(accelerator="cpu", devices=processes, max_steps=1, accumulate_grad_batches=accumulate,
                        strategy="ddp_spawn" if processes > 1 else "auto", use_distributed_sampler=False,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    per_rank = [batches[r * accumulate:(r + 1) * accumulate] for r in range(processes)]
    trainer.fit(module, datamodule=RankBatches(per_rank))
    return module.kept[0] if processes == 1 else None


def test_a_steps_loss_is_over_all_its_scored_tokens_whatever_the_micro_batches():
    """Accumulating micro-batches that score 4 and 27 tokens: the step's loss and gradients are the
    sum over all 31 scored tokens / 31 (transformers' num_items_in_batch, TRL's SFTTrainer), not the
    mean of the two micro-batches' means; one micro-batch of the same rows gives the same."""
    batches = contract_batches(2)
    module = kept_module()
    model = SmolLM(module.config)
    model.load_state_dict(module.model.state_dict())
    total, count = 0.0, 0
    for b in batches:  # the reference: summed per-token cross entropy, per-document positions
        ids, mask = b["input_ids"], b["loss_mask"]
        logits = model(ids[:, :-1], document_ids=b["document_ids"])
        total = total + F.cross_entropy(logits[mask], ids[:, 1:][mask], reduction="sum")
        count += int(mask.sum())
    ref = total / count
    ref.backward()
    kept, loss = train_one_step(module, batches, accumulate=2)
    assert abs(loss - ref.item()) < 1e-5
    for name, p in model.named_parameters():
        torch.testing.assert_close(kept[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    means = [model.loss(b["input_ids"][:, :-1], b["input_ids"][:, 1:], b["loss_mask"],
                        document_ids=b["document_ids"]).item() for b in batches]
    assert abs(sum(means) / 2 - ref.item()) > 1e-2  # the mean of the means would be another loss

    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}  # one micro-batch of 4 rows
    one = kept_module()
    kept_one, loss_one = train_one_step(one, [whole], accumulate=1)
    assert abs(loss_one - loss) < 1e-5
    for name, g in kept.items():
        torch.testing.assert_close(kept_one[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_without_loss_masks_a_step_is_the_mean_of_its_micro_batches_as_before():
    batches = contract_batches(2, masks=False)
    module = kept_module()
    model = SmolLM(module.config)
    model.load_state_dict(module.model.state_dict())
    losses = [model.loss(b["input_ids"][:, :-1], b["input_ids"][:, 1:], document_ids=b["document_ids"])
              for b in batches]
    (sum(losses) / 2).backward()
    kept, loss = train_one_step(module, batches, accumulate=2)
    assert loss == pytest.approx((losses[0].item() + losses[1].item()) / 2, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(kept[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_validation_weighs_each_batch_by_its_scored_tokens():
    module = kept_module()
    batches = contract_batches(2)
    with torch.no_grad():
        for b in batches:
            module.validation_step(b, 0)
        total = sum(module.model.loss(b["input_ids"][:, :-1], b["input_ids"][:, 1:], b["loss_mask"],
                                      document_ids=b["document_ids"]) * b["loss_mask"].sum() for b in batches)
    count = sum(int(b["loss_mask"].sum()) for b in batches)
    assert abs(module.val_loss.compute().item() - (total / count).item()) < 1e-5


@pytest.mark.slow
def test_under_ddp_a_steps_loss_is_over_the_scored_tokens_of_every_process(tmp_path):
    """2 processes x 2 micro-batches scoring 4 to 27 tokens each: every process applies the gradient of
    the sum over all the step's scored tokens / their count, and logs that loss (transformers'
    average_tokens_across_devices)."""
    batches = contract_batches(4)
    one = kept_module()
    kept, loss = train_one_step(one, batches, accumulate=4)  # the same step on one process
    ddp = kept_module()
    ddp.save_to = str(tmp_path / "kept")
    train_one_step(ddp, batches, accumulate=2, processes=2)
    for rank in (0, 1):
        grads, rank_loss = torch.load(f"{ddp.save_to}.{rank}", weights_only=True)
        assert abs(rank_loss - loss) < 1e-5
        for name, g in kept.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


# ---- --data.document_mask: pretraining windows, attention within each document ----

def test_document_mask_gives_a_window_of_two_documents_the_loss_of_its_parts_run_apart(make_dm):
    """With document_mask a window's batch carries document_ids that start a document after each
    EOS, and a window spanning two documents scores as its two pieces run separately; off, the
    batch is today's, key for key and value for value."""
    dm = ready(make_dm(document_mask=True))
    batch = next(iter(dm.train_dataloader()))
    plain = next(iter(ready(make_dm()).train_dataloader()))
    assert set(plain) == {"input_ids", "index", "n_bytes"} and set(batch) == set(plain) | {"document_ids"}
    assert all(torch.equal(batch[k], plain[k]) for k in plain)
    eos = dm.tokenizer.eos_token_id
    for row, doc in zip(batch["input_ids"][:, :-1].tolist(), batch["document_ids"].tolist()):
        assert doc == [sum(t == eos for t in row[:i]) for i in range(len(row))]  # EOSes strictly before

    # A window with one EOS inside its inputs: two documents, the first ending with that EOS.
    collate = dm.train_dataloader().collate_fn
    window = next(w for w in map(dm.train_dataset.__getitem__, range(len(dm.train_dataset)))
                  if (w["input_ids"][:-1] == eos).sum() == 1 and w["input_ids"][-2] != eos)
    one = collate([window])
    inputs, targets, ids = one["input_ids"][:, :-1], one["input_ids"][:, 1:], one["document_ids"]
    cut = int((inputs[0] == eos).nonzero()[0]) + 1
    assert ids[0].tolist() == [0] * cut + [1] * (inputs.shape[1] - cut)
    model = SmolLM(ModelConfig.from_name("tiny", vocab_size=dm.vocab_size))
    with torch.no_grad():
        loss = model.loss(inputs, targets, document_ids=ids)
        apart = (model.loss(inputs[:, :cut], targets[:, :cut]) * cut
                 + model.loss(inputs[:, cut:], targets[:, cut:]) * (inputs.shape[1] - cut)) / inputs.shape[1]
        assert abs(loss.item() - apart.item()) < 1e-5
        assert abs(loss.item() - model.loss(inputs, targets).item()) > 1e-4  # the mask mattered


def test_document_mask_is_saved_and_a_resume_with_the_other_setting_says_so(make_dm, capsys):
    saved = ready(make_dm()).state_dict()
    assert saved["document_mask"] is False
    ready(make_dm()).load_state_dict(saved)
    ready(make_dm()).load_state_dict({k: v for k, v in saved.items() if k != "document_mask"})  # an older checkpoint
    assert "--data.document_mask" not in capsys.readouterr().err
    ready(make_dm(document_mask=True)).load_state_dict(saved)
    said = [line for line in capsys.readouterr().err.splitlines() if "--data.document_mask" in line]
    assert said == ["warning: --data.document_mask false -> true since the checkpoint: from the resumed step on, "
                    "attention stays within each document"]
    assert "attention within documents" in ready(make_dm(document_mask=True)).describe()


def test_a_decoder_layer_compiles_as_one_graph_for_a_packed_training_step():
    """LitSmolLM's compile option compiles each layer: a packed row's mask and per-row positions
    go through it as one graph, forward and backward (aot_eager traces both)."""
    from smollm.model import DecoderLayer, RotaryEmbedding

    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", num_hidden_layers=1)
    layer = DecoderLayer(cfg, 0)
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    starts = document_starts(torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7]))
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(16) - starts, torch.float32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, cos, sin, documents=document_mask(starts))
    out.square().mean().backward()
    torch.testing.assert_close(out, layer(x, cos, sin, documents=document_mask(starts)))
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_under_compile_packed_rows_take_the_mask_and_trace_as_one_graph():
    """varlen's loop over documents would be a graph per batch: LitSmolLM's compile option gives its
    compiled layers the mask (whose compiled step the test above checks), and a model compiled whole
    takes the mask too, so its forward over a packed batch is one graph (fullgraph raises otherwise)."""
    assert LitSmolLM(preset="tiny", config_overrides={"vocab_size": VOCAB}).model.document_attention == "varlen"
    assert LitSmolLM(preset="tiny", config_overrides={"vocab_size": VOCAB}, compile=True).model.document_attention \
        == "sdpa"
    model = tiny().eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(10))
    ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    with torch.no_grad():
        expected = model(x, document_ids=ids)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x, document_ids=ids)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


def test_flex_attention_training_on_a_cpu_is_refused_in_one_line(tmp_path, data, capsys):
    import fitutil
    from smollm.fit import main

    corpus, tok = data
    assert main(fitutil.fit_args(tmp_path, corpus, tok, 1, extra=["--model.document_attention", "flex"])) == 2
    err = capsys.readouterr().err
    assert "error: --model.document_attention flex trains on a GPU only" in err and "Traceback" not in err
