"""`python -m smollm.chat`: talk with a model, turn by turn, through its tokenizer's own chat template.

    python -m smollm.chat --checkpoint PATH [--system TEXT] [--max_new_tokens 256]
        [--temperature 0] [--top_k K] [--top_p P] [--seed S]

PATH is a .ckpt of smollm.fit or a Hugging Face folder. Each line you type is a user turn; the
whole conversation is rendered by the chat template (add_generation_prompt), the reply is
generated with smollm.generate's KV cache and streamed to stdout as it comes, and it ends at the
template's end-of-turn token (ChatML's <|im_end|>) or the EOS. `/reset` forgets the conversation
(the system prompt stays), `/quit` or end of input ends. When standard input is not a terminal it
is read line by line without a prompt, so a script can drive it:

    printf 'Hi\nWho are you?\n' | python -m smollm.chat --checkpoint smollm2-hf
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator, TextIO

import torch

from smollm.assets import chat_template, stop_token_ids
from smollm.cli import command
from smollm.errors import UsageError, first_line
from smollm.generate import add_sampling_options, generate, load_for_generation, sampling_options
from smollm.model import SmolLM
from smollm.output import note, warn

RESET, QUIT = "/reset", "/quit"


class Streamer:
    """Writes a reply's tokens to `out` as they come. The tokens so far are decoded together and
    only the new text is written, so a character whose bytes span several tokens comes out whole
    (held back while its decoding still ends in U+FFFD)."""

    def __init__(self, tokenizer: Any, out: TextIO, stop: list[int]) -> None:
        self.tokenizer, self.out, self.stop = tokenizer, out, set(stop)
        self.ids: list[int] = []
        self.written = 0  # characters of the decoded reply already written

    def __call__(self, token: torch.Tensor) -> None:
        token_id = int(token[0])
        if token_id in self.stop:
            return
        self.ids.append(token_id)
        text = self.text()
        if not text.endswith("\ufffd"):
            self.write(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def write(self, text: str) -> None:
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)

    def finish(self) -> str:
        """Write what was held back and end the line; the reply's text."""
        text = self.text()
        self.write(text)
        self.out.write("\n")
        self.out.flush()
        return text


class Chat:
    """A conversation with a model: the system prompt, the turns so far, and the next reply."""

    def __init__(self, model: SmolLM, tokenizer: Any, where: str, system: str | None = None,
                 max_new_tokens: int = 256, **sampling: Any) -> None:
        chat_template(tokenizer, where)  # a tokenizer without one is one line
        self.model, self.tokenizer, self.where, self.system = model, tokenizer, where, system
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.stop = stop_token_ids(tokenizer)
        self.context = model.config.max_position_embeddings
        if not isinstance(max_new_tokens, int) or not 0 < max_new_tokens < self.context:
            raise UsageError(f"--max_new_tokens must be between 1 and {self.context - 1} (the model's context is "
                             f"{self.context} tokens and the conversation needs some), got {max_new_tokens}")
        self.messages: list[dict[str, str]] = []

    def reset(self) -> None:
        self.messages = []

    def prompt_ids(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """The conversation so far (or `messages`), after the system prompt, rendered by the chat
        template and ending in the assistant's cue."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = self.messages if messages is None else messages
        try:
            return list(self.tokenizer.apply_chat_template(system + messages, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        except Exception as e:  # noqa: BLE001  jinja's TemplateError and the template's own raise_exception
            raise UsageError(f"the chat template of {self.where} cannot render this conversation "
                             f"({first_line(e)})") from None

    def fitting_prompt(self) -> list[int] | None:
        """`prompt_ids`, leaving out the oldest turns until it and the reply fit the model's context
        (one line when it does); None, with a warning and the conversation untouched, when the last
        message does not fit even alone."""
        room = self.context - self.max_new_tokens
        alone = self.prompt_ids(self.messages[-1:])
        if len(alone) > room:
            self.messages.pop()
            warn(f"that message makes a prompt of {len(alone)} tokens, and with --max_new_tokens "
                 f"{self.max_new_tokens} it does not fit the model's context of {self.context}; it was not sent: "
                 "say it shorter, or lower --max_new_tokens")
            return None
        ids, dropped = self.prompt_ids(), 0
        while len(ids) > room:
            self.messages.pop(0)
            dropped += 1
            while self.messages[0]["role"] != "user":  # the conversation starts with a user's turn
                self.messages.pop(0)
                dropped += 1
            ids = self.prompt_ids()
        if dropped:
            note(f"the conversation outgrew the model's context ({self.context} tokens, {self.max_new_tokens} of "
                 f"them kept for the reply): its {dropped} oldest messages are left out from now on")
        return ids

    def reply(self, text: str, out: TextIO) -> str | None:
        """Add the user's `text`, stream the reply to `out` and keep it; None when nothing was sent."""
        self.messages.append({"role": "user", "content": text})
        ids = self.fitting_prompt()
        if ids is None:
            return None
        device = next(self.model.parameters()).device
        stream = Streamer(self.tokenizer, out, self.stop)
        try:
            out_ids = generate(self.model, torch.tensor([ids], device=device), self.max_new_tokens,
                               eos_token_id=self.stop, on_token=stream, **self.sampling)
        except KeyboardInterrupt:
            stream.finish()
            self.messages.pop()
            note("reply interrupted; that turn is left out of the conversation")
            return None
        answer = stream.finish()
        if out_ids[0, -1].item() not in self.stop:
            note(f"the reply reached --max_new_tokens {self.max_new_tokens} before its end-of-turn token")
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def read_lines(stdin: TextIO, interactive: bool) -> Iterator[str]:
    """The user's lines: prompted with "> " at a terminal, read plainly from a pipe or file."""
    while True:
        if interactive:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return
        else:
            line = stdin.readline()
            if not line:
                return
        yield line.rstrip("\r\n")


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm.chat",
                                     description="Talk with a model through its tokenizer's chat template.")
    parser.add_argument("--checkpoint", required=True, help="a Hugging Face directory or a .ckpt file")
    parser.add_argument("--system", default=None, help="the system prompt (default: the template's own, if any)")
    add_sampling_options(parser, max_new_tokens=256)
    args = parser.parse_args(argv)
    sampling = sampling_options(args)

    model, tokenizer = load_for_generation(args.checkpoint)
    chat = Chat(model, tokenizer, args.checkpoint, args.system, args.max_new_tokens, **sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  line editing and history for input()

        note(f"chatting with {args.checkpoint}; {RESET} forgets the conversation, {QUIT} or Ctrl-D ends")
    for line in read_lines(sys.stdin, interactive):
        if line.strip() == QUIT:
            break
        if line.strip() == RESET:
            chat.reset()
            note("the conversation is forgotten" + (" (the system prompt stays)" if args.system else ""))
            continue
        if line.strip():
            chat.reply(line, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
