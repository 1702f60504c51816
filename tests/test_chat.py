"""`python -m smollm.chat`, and exports that chat out of the box (issue 25, items 8 and 9).

A tiny model and a tiny byte-level tokenizer carrying SmolLM2's own ChatML template: like the
"smollm2" tokenizer, its EOS is <|endoftext|>, so a reply must stop at the template's <|im_end|>.
One model is crafted to close its first reply with <|im_end|> after a known number of tokens (its
lm_head rows of that token and of <|im_end|> swapped), so "stops at <|im_end|>" is checked in
smollm, in transformers' generate on the exported folder, and in llama.cpp where it is installed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smollm.chat as chat_module
from smollm import ModelConfig, SmolLM
from smollm.chat import Streamer
from smollm.chat import main as chat_main
from smollm.checkpoint import save_atomic, vocab_digest
from smollm.generate import generate
from smollm.hf import save_hf

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["Hi there, who are you and what can you do for me today?",
        "The capital of France is Paris, and the capital of Italy is Rome.",
        "I am a small assistant. I answer questions about the world, briefly."]
# SmolLM2-135M-Instruct's chat template, as its tokenizer carries it: ChatML with a default system turn.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STOP_AFTER = 3  # the crafted model's first reply: 3 tokens, then <|im_end|>


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(a tokenizer folder with the ChatML template and its tokens, the same tokenizer without)."""
    from transformers import AutoTokenizer

    from helpers_data import make_tokenizer

    base = tmp_path_factory.mktemp("tok")
    plain = Path(make_tokenizer(base / "plain", 300, texts=TEXT))
    tok = AutoTokenizer.from_pretrained(str(plain))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(str(base / "chatml"))
    return base / "chatml", plain


@pytest.fixture(scope="module")
def tok(tok_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dirs[0]))


def render(tok, messages: list[dict[str, str]]) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def tiny(tok, **overrides) -> SmolLM:
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=320, tie_word_embeddings=False, **overrides)
    assert len(tok) <= 320
    return SmolLM(config).eval()


@pytest.fixture(scope="module")
def crafted(tok) -> SmolLM:
    """A tiny model whose greedy reply to "Hi" is STOP_AFTER tokens and then <|im_end|>: the rows of
    lm_head for the token it would say next and for <|im_end|> are swapped, which changes no earlier
    argmax (neither token was one)."""
    model = tiny(tok)
    im_end, prompt = tok.convert_tokens_to_ids("<|im_end|>"), render(tok, [user("Hi")])
    greedy = generate(model, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    say, then = greedy[:STOP_AFTER], greedy[STOP_AFTER]
    assert then not in say and im_end not in say + [then] and tok.eos_token_id not in say, greedy
    with torch.no_grad():
        model.lm_head.weight[[then, im_end]] = model.lm_head.weight[[im_end, then]].clone()
    return model


@pytest.fixture(scope="module")
def folder(crafted, tok, tmp_path_factory) -> Path:
    return save_hf(crafted, tmp_path_factory.mktemp("hf") / "m", tokenizer=tok)


@pytest.fixture(scope="module")
def ckpt(crafted, tok, tok_dirs, tmp_path_factory) -> Path:
    """The crafted model as a training checkpoint: the entries `load_model` reads of what smollm.fit
    writes (the weights under "model.", the model config, the tokenizer and its ids)."""
    path = tmp_path_factory.mktemp("ckpt") / "step=000001.ckpt"
    save_atomic({"state_dict": {f"model.{k}": v for k, v in crafted.state_dict().items()},
                 "smollm": {"model_config": crafted.config.to_dict(), "tokenizer": str(tok_dirs[0]),
                            "tokenizer_ids": vocab_digest(tok)}}, path)
    return path


@pytest.fixture
def calls(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Every (prompt ids, new ids) that the chat command hands to and gets from `generate`."""
    seen = []

    def recording(model, input_ids, *args, **kwargs):
        out = generate(model, input_ids, *args, **kwargs)
        seen.append((input_ids[0].tolist(), out[0, input_ids.shape[1]:].tolist()))
        return out

    monkeypatch.setattr(chat_module, "generate", recording)
    return seen


def run_chat(monkeypatch, capsys, path: Path, stdin: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # not a terminal: read line by line
    rc = chat_main(["--checkpoint", str(path), *args])
    out, err = capsys.readouterr()
    return rc, out, err


def reply_text(tok, new: list[int]) -> str:
    return tok.decode([i for i in new if i != tok.convert_tokens_to_ids("<|im_end|>")], skip_special_tokens=True)


# ---- the chat command


def test_each_turn_is_the_chat_template_of_the_conversation_so_far(monkeypatch, capsys, calls, folder, tok):
    rc, out, err = run_chat(monkeypatch, capsys, folder, "Hi\nWho are you?\n", "--system", "Be brief.",
                            "--max_new_tokens", "6")
    assert rc == 0, err
    (first, new1), (second, new2) = calls
    system = {"role": "system", "content": "Be brief."}
    answer = reply_text(tok, new1)
    assert first == render(tok, [system, user("Hi")])
    assert second == render(tok, [system, user("Hi"), {"role": "assistant", "content": answer},
                                  user("Who are you?")])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(second)
    assert out == answer + "\n" + reply_text(tok, new2) + "\n"  # streamed replies, one after the other


def test_a_reply_stops_at_the_end_of_turn_token(monkeypatch, capsys, calls, folder, tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|endoftext|>" and im_end != tok.eos_token_id  # as the smollm2 tokenizer
    rc, out, err = run_chat(monkeypatch, capsys, folder, "Hi\n", "--max_new_tokens", "10")
    assert rc == 0, err
    [(_, new)] = calls
    assert len(new) == STOP_AFTER + 1 and new[-1] == im_end  # stopped right at <|im_end|>
    assert out == tok.decode(new[:-1]) + "\n" and "<|im_end|>" not in out
    assert "max_new_tokens" not in err  # it ended on its own


def test_reset_forgets_the_conversation_and_keeps_the_system_prompt(monkeypatch, capsys, calls, folder, tok):
    rc, out, err = run_chat(monkeypatch, capsys, folder, "Hi\nAgain\n/reset\nAgain\n/quit\nnever read\n",
                            "--system", "S", "--max_new_tokens", "4")
    assert rc == 0, err
    prompts = [prompt for prompt, _ in calls]
    assert len(prompts) == 3  # /quit ended it
    assert prompts[2] == render(tok, [{"role": "system", "content": "S"}, user("Again")])
    assert len(prompts[1]) > len(prompts[2])  # the second turn had the first one before it
    assert "forgotten" in err


def test_a_long_conversation_keeps_its_latest_turns_within_the_context(monkeypatch, capsys, calls, tok, tmp_path):
    path = save_hf(tiny(tok, max_position_embeddings=72), tmp_path / "short", tokenizer=tok)
    lines = ["Hi there", "who are you", "what can you do", "the capital of France", "and of Italy"]
    rc, out, err = run_chat(monkeypatch, capsys, path, "\n".join(lines) + "\n", "--system", "S",
                            "--max_new_tokens", "8")
    assert rc == 0, err
    assert len(calls) == len(lines) and all(len(prompt) + 8 <= 72 for prompt, _ in calls)
    assert "oldest messages are left out" in err
    turns = []  # the whole conversation; the last prompt is its latest turns that fit, from a user turn on
    for line, (_, new) in zip(lines, calls):
        turns += [user(line), {"role": "assistant", "content": reply_text(tok, new)}]
    kept = [render(tok, [{"role": "system", "content": "S"}] + turns[i:-1]) for i in range(0, len(turns) - 1, 2)]
    assert calls[-1][0] in kept[1:]


def test_a_message_too_long_for_the_context_is_not_sent_and_the_chat_goes_on(monkeypatch, capsys, calls, tok,
                                                                             tmp_path):
    path = save_hf(tiny(tok, max_position_embeddings=72), tmp_path / "short", tokenizer=tok)
    rc, out, err = run_chat(monkeypatch, capsys, path, "Hi\n" + "word " * 80 + "\nAgain\n", "--system", "S",
                            "--max_new_tokens", "8")
    assert rc == 0 and "it was not sent" in err
    system = {"role": "system", "content": "S"}
    answer = {"role": "assistant", "content": reply_text(tok, calls[0][1])}
    assert [prompt for prompt, _ in calls] == [render(tok, [system, user("Hi")]),
                                               render(tok, [system, user("Hi"), answer, user("Again")])]


def test_a_tokenizer_without_a_chat_template_is_one_line(monkeypatch, capsys, tok_dirs, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tok_dirs[1]))
    path = save_hf(tiny(plain), tmp_path / "plain", tokenizer=plain)
    rc, out, err = run_chat(monkeypatch, capsys, path, "Hi\n")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [f"error: the tokenizer of {path} has no chat template (no chat_template in "
                                        "its tokenizer_config.json nor a chat_template.jinja); use a tokenizer "
                                        "that has one, such as 'smollm2'"]


def test_characters_spanning_tokens_are_streamed_whole(tok):
    text = "Paris é 😀 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # é and 😀 are several byte tokens each
    out, seen = io.StringIO(), []
    stream = Streamer(tok, out, stop=[])
    for i in ids:
        stream(torch.tensor([i]))
        seen.append(out.getvalue())
    assert stream.finish() == text and out.getvalue() == text + "\n"
    assert all("\ufffd" not in s for s in seen) and len(set(seen)) > 3  # whole characters, as they come


def test_a_training_checkpoint_chats_and_a_script_drives_the_command(monkeypatch, capsys, ckpt, folder):
    rc, out, err = run_chat(monkeypatch, capsys, folder, "Hi\nWho are you?\n", "--max_new_tokens", "5")
    assert rc == 0, err
    proc = subprocess.run(f"printf 'Hi\\nWho are you?\\n' | {sys.executable} -m smollm.chat --checkpoint {ckpt} "
                          "--max_new_tokens 5", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == out  # the .ckpt is the same model: the same two replies


# ---- exports that chat: convert ckpt (a Hugging Face folder) and to-gguf


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> Path:
    from smollm.convert import convert_ckpt

    return convert_ckpt(ckpt, tmp_path_factory.mktemp("export") / "hf")


def test_transformers_chats_with_the_exported_folder_and_stops_at_im_end(exported, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    theirs = AutoTokenizer.from_pretrained(str(exported))
    messages = [user("Hi"), {"role": "assistant", "content": "Hello!"}, user("Who are you?")]
    assert render(theirs, messages) == render(tok, messages)
    assert render(theirs, [user("Hi")]) == render(tok, [user("Hi")])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(str(exported)).eos_token_id == [im_end, tok.eos_token_id]

    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    prompt = theirs.apply_chat_template([user("Hi")], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert out.tolist()[-1] == im_end and len(out) == STOP_AFTER + 1  # its own generate stops there


def test_the_gguf_carries_the_template_and_the_end_of_turn_token(ckpt, tok, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from smollm.convert import convert_to_gguf

    convert_to_gguf(ckpt, tmp_path / "m.gguf")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == CHATML
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert render(theirs, [user("Hi")]) == render(tok, [user("Hi")])


def test_llama_cpp_chats_with_the_gguf_and_stops_at_im_end(ckpt, tok, tmp_path):
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp is not installed here (pip install llama-cpp-python builds it): {e}")
    from smollm.checkpoint import load_model
    from smollm.convert import convert_to_gguf

    convert_to_gguf(ckpt, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, verbose=False)
    reply = llm.create_chat_completion(messages=[user("Hi")], max_tokens=10, temperature=0.0)["choices"][0]
    prompt = render(tok, [user("Hi")])
    ours = generate(load_model(ckpt).model, torch.tensor([prompt]), 10)[0, len(prompt):].tolist()
    assert reply["finish_reason"] == "stop"  # at <|im_end|>, an end-of-generation token to llama.cpp
    assert reply["message"]["content"] == tok.decode(ours[:STOP_AFTER])


def test_generation_config_names_every_stop_token(tok, tok_dirs, tmp_path):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tok_dirs[1]))
    save_hf(tiny(plain), tmp_path / "plain", tokenizer=plain)
    config = json.loads((tmp_path / "plain" / "generation_config.json").read_text())
    assert config["eos_token_id"] == plain.eos_token_id  # no template: the EOS alone
    save_hf(tiny(tok), tmp_path / "chat", tokenizer=tok)
    assert (tmp_path / "chat" / "chat_template.jinja").read_text() == CHATML
