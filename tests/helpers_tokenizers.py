"""SentencePiece-style tokenizers built here (no hub): Llama 2's and Mistral's layout (a "▁" for each
space, one before the text, byte-fallback tokens <0x00>..<0xFF> for what the vocabulary lacks), as
a BPE with the legacy normalizer, a BPE with the Metaspace pre-tokenizer, and a Unigram."""

from __future__ import annotations

import json
from pathlib import Path

from helpers_data import sentences

BYTES = [f"<0x{b:02X}>" for b in range(256)]
SPECIAL = ["<unk>", "<s>", "</s>"]
KINDS = ("llama2", "metaspace", "unigram")


def _decoder(prepend: bool) -> dict:
    steps = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
             {"type": "Fuse"}]
    return {"type": "Sequence", "decoders": steps + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                                     if prepend else [])}


def sentencepiece_tokenizer(directory: str | Path, kind: str = "llama2", vocab_size: int = 400) -> str:
    """A Hugging Face tokenizer folder of `kind` (KINDS), EOS "</s>", trained on `sentences`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [sentences(200), "中文字符在这里。 naïve café\n\n  x"]
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, unk_token="<unk>",
                                          show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    if kind == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    model = spec["model"]
    if kind == "unigram":
        known = {piece for piece, _ in model["vocab"]}
        model["vocab"] += [[b, -20.0] for b in BYTES if b not in known]
    else:
        for b in BYTES:
            model["vocab"].setdefault(b, len(model["vocab"]))
        model["unk_token"] = "<unk>"
    model["byte_fallback"] = True
    spec["decoder"] = _decoder(prepend=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))
    return str(directory)
