"""generate(): greedy and sampled decoding with the KV cache, and `python -m smollm.generate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm.errors import UsageError
from smollm.generate import generate
from smollm.hf import save_hf

ROOT = Path(__file__).resolve().parents[1]
PROMPT = torch.randint(0, 49152, (1, 7), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def test_greedy_equals_argmax_of_full_forward(tiny_model):
    out = generate(tiny_model, PROMPT, max_new_tokens=12)
    assert out.shape == (1, 7 + 12) and torch.equal(out[:, :7], PROMPT)
    ids = PROMPT
    for _ in range(12):  # no cache: the whole sequence every step
        ids = torch.cat([ids, tiny_model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling_reproducible_under_seed(tiny_model):
    def sample(seed, **kw):
        torch.manual_seed(seed)
        return generate(tiny_model, PROMPT, max_new_tokens=16, temperature=1.0, **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0, top_k=50, top_p=0.9), sample(0, top_k=50, top_p=0.9))
    first = generate(tiny_model, PROMPT, 16, temperature=0.8, generator=torch.Generator().manual_seed(7))
    again = generate(tiny_model, PROMPT, 16, temperature=0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_model):
    greedy = generate(tiny_model, PROMPT, max_new_tokens=10)
    assert torch.equal(generate(tiny_model, PROMPT, 10, temperature=1.5, top_k=1), greedy)
    assert torch.equal(generate(tiny_model, PROMPT, 10, temperature=1.5, top_p=1e-6), greedy)


def test_top_k_restricts_the_draw(tiny_model):
    with torch.no_grad():
        top = tiny_model(PROMPT)[0, -1].topk(3).indices
    torch.manual_seed(0)
    firsts = set(generate(tiny_model, PROMPT.expand(64, -1), 1, temperature=5.0, top_k=3)[:, -1].tolist())
    assert firsts <= set(top.tolist()) and len(firsts) > 1


def test_eos_stops_and_pads_with_eos(tiny_model):
    greedy = generate(tiny_model, PROMPT, max_new_tokens=8)
    eos = greedy[0, 7 + 2].item()  # the third generated token becomes "eos"
    out = generate(tiny_model, PROMPT, max_new_tokens=8, eos_token_id=eos)
    first = (greedy[0, 7:] == eos).nonzero()[0].item()
    assert torch.equal(out, greedy[:, :7 + first + 1])  # stopped right after producing eos

    # In a batch, a row that finished keeps emitting eos until every row has finished.
    torch.manual_seed(0)
    other = torch.randint(0, 49152, (1, 7))
    batch = torch.cat([PROMPT, other])
    out = generate(tiny_model, batch, max_new_tokens=8, eos_token_id=eos)
    alone = generate(tiny_model, other, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(out[1, :alone.shape[1]], alone[0])
    assert torch.all(out[0, 7 + first:] == eos)


def test_any_of_several_stop_ids_stops_and_each_token_is_handed_over_as_it_comes(tiny_model):
    greedy = generate(tiny_model, PROMPT, max_new_tokens=8)[0, 7:].tolist()
    third, unsaid = greedy[2], next(i for i in range(10) if i not in greedy[:3])
    assert third not in greedy[:2]
    seen = []
    out = generate(tiny_model, PROMPT, max_new_tokens=8, eos_token_id=[unsaid, third],
                   on_token=lambda token: seen.append(token.tolist()))
    assert out[0, 7:].tolist() == greedy[:3]  # stopped at the first stop id produced, whichever
    assert seen == [[t] for t in greedy[:3]]  # one call per step, in order
    with pytest.raises(UsageError, match="eos_token_id"):
        generate(tiny_model, PROMPT, 2, eos_token_id=[1, 10**6])


def test_batch_equals_each_prompt_alone(tiny_model):
    torch.manual_seed(1)
    batch = torch.randint(0, 49152, (2, 9))
    out = generate(tiny_model, batch, max_new_tokens=10)
    for row in range(2):
        assert torch.equal(out[row], generate(tiny_model, batch[row:row + 1], max_new_tokens=10)[0])


def test_restores_training_mode_and_needs_no_grad(tiny_model):
    tiny_model.train()
    out = generate(tiny_model, PROMPT, max_new_tokens=3)
    assert tiny_model.training and not out.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": PROMPT[0]}, "input_ids must be a non-empty"),
    ({"input_ids": PROMPT.float()}, "input_ids must be a non-empty"),
    ({"input_ids": PROMPT[:, :0]}, "input_ids must be a non-empty"),
    ({"input_ids": PROMPT + 49152}, r"input_ids must lie in \[0, 49152\)"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": 2000}, "exceeds the model's max_position_embeddings 1024"),
    ({"temperature": -0.5}, "temperature must be"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"eos_token_id": 49152}, "eos_token_id must be a token id"),
])
def test_argument_errors(tiny_model, kwargs, message):
    args = {"input_ids": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_model, **args)


def test_zero_new_tokens_returns_the_prompt(tiny_model):
    assert torch.equal(generate(tiny_model, PROMPT, max_new_tokens=0), PROMPT)


def test_greedy_equals_transformers_generate(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    save_hf(tiny_model, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = torch.randint(0, 49152, (2, 6), generator=torch.Generator().manual_seed(9))
    expected = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=20, min_new_tokens=20, pad_token_id=0)
    assert torch.equal(generate(tiny_model, prompts, max_new_tokens=20), expected)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "smollm.generate", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_on_hf_dir(tmp_path, tiny_model, tiny_tokenizer, capsys):
    from smollm.generate import main

    save_hf(tiny_model, tmp_path, tokenizer=tiny_tokenizer)
    assert main(["--checkpoint", str(tmp_path), "--prompt", "The quick brown fox",
                 "--max_new_tokens", "5", "--temperature", "0.7", "--top_k", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The quick brown fox")

    assert main(["--checkpoint", str(tmp_path), "--prompt", "The quick brown fox", "--max_new_tokens", "1"]) == 0
    ids = tiny_tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        token = tiny_model(torch.tensor([ids]))[0, -1].argmax().item()
    assert capsys.readouterr().out.strip() == (f"next token after 'The quick brown fox': "
                                               f"{tiny_tokenizer.decode([token])!r} (id {token})")


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    """An absent path through a fresh process (the whole stderr is one line, no traceback), then a file
    that is no checkpoint through the command's main in this process."""
    from smollm.generate import main

    proc = run_cli("--checkpoint", str(tmp_path / "absent"), "--prompt", "hello")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    (tmp_path / "weights.pt").write_bytes(b"x")
    assert main(["--checkpoint", str(tmp_path / "weights.pt"), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "weights.pt" in err


def test_output_can_feed_training(tiny_model):
    out = generate(tiny_model, PROMPT, max_new_tokens=3)
    assert not out.is_inference()
    tiny_model.train()
    tiny_model(out).sum().backward()  # an inference-mode tensor would raise here


def test_sampling_options_at_temperature_0_get_one_line_saying_they_do_nothing(tmp_path, tiny_model, tiny_tokenizer,
                                                                              capsys):
    from smollm.generate import main

    save_hf(tiny_model, tmp_path, tokenizer=tiny_tokenizer)
    common = ["--checkpoint", str(tmp_path), "--prompt", "The quick brown fox", "--max_new_tokens", "3"]
    assert main(common) == 0
    greedy = capsys.readouterr()
    assert main([*common, "--top_k", "50", "--top_p", "0.95", "--seed", "1"]) == 0
    ignored = capsys.readouterr()
    assert ignored.out == greedy.out  # greedy, whatever they say
    said = [line for line in ignored.err.splitlines() if line not in greedy.err.splitlines()]
    assert len(said) == 1 and all(o in said[0] for o in ("--top_k", "--top_p", "--seed", "--temperature 0")), said
    assert main([*common, "--temperature", "0.7", "--top_k", "50", "--seed", "1"]) == 0
    assert capsys.readouterr().err == greedy.err  # sampling: they are applied, nothing to say
