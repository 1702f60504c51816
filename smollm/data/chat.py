"""Conversations -> tokens and a loss mask, through the tokenizer's own chat template.

A record is a conversation: `messages`, a list of {role, content} (roles system, user, assistant;
multi-turn), the form of OpenAI's API and of smol-smoltalk; or `prompt` and `completion`, each a
string (a user turn, an assistant turn) or a list of messages. `conversation` checks a record and
gives its messages (only role and content are kept) and the first message that trains: 0 for
`messages`, the completion's first for prompt/completion (as TRL trains on the completion only).

The tokens are exactly `tokenizer.apply_chat_template(messages, tokenize=True)`: the template
renders the text, and the tokenizer encodes it with its special tokens recognized. So training
sees the tokens that inference will (a "<|im_end|>" written inside a message is the special token
there too, as apply_chat_template makes it).

The loss falls on the assistant replies. Templates such as SmolLM2's ChatML have no
{% generation %} markers, so the replies are found by rendering prefixes: reply i spans from the
end of render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i+1]), and
both must be the beginning of the whole conversation's text (the prefix property; a template or a
record where it fails is refused in one line). A reply's turn closes with the template's
end-of-turn token (the first special token that the template writes after a reply's content,
"<|im_end|>" for ChatML), which carries loss; what the template writes after it (ChatML's "\\n")
is its separator between turns, which the model never generates (generation stops at the
end-of-turn token), so it carries none. A token carries loss when any character of its text lies
in a reply (a token that joins the prompt's last "\\n" with a reply's first characters is one the
model must generate). `loss_on="all"` puts loss on every token but a conversation's first.

The mask is per token: `mask[j]` says whether token j carries loss as a target (predicted from
tokens before it), so `mask[0]` is always False.

A preference record (`--data.format preference`, DPO) is a pair: `prompt`, `chosen` and `rejected`.
The prompt is a string (a user turn) or a list of messages; each reply is a string (an assistant
turn), a list of messages, or the whole conversation starting with the prompt's messages (the
UltraFeedback-binarized form, whose prompt is a string and whose replies are [user, assistant]).
`preference_pair` checks a record and gives the three lists of messages. Each side of the pair is
rendered as prompt + reply and ends with the reply's end-of-turn token (the separator after it is
left out: the model never generates it); the loss mask marks the reply as in a conversation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from smollm.errors import DataError

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")
_SENTINEL = "\ue000smollm-reply\ue001"  # private-use characters: in no real reply


# ------------------------------------------------------------------------------------------------
# Records -> conversations


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A list of {role, content} checked and reduced to those two keys."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {field!r} is {_json_type(value)}, not a list of messages; give "
                        '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {field}[{k}] is {_json_type(message)}, not a message; each message is "
                            '{"role": ..., "content": ...}')
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{k}] has role {role!r}; the roles are system, user and assistant "
                            "(fix or drop that record)")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{k}] ({role}) has content that is {_json_type(content)}, not a "
                            "string; fix or drop that record")
        out.append({"role": role, "content": content})
    return out


def conversation(record: Any, where: str) -> tuple[list[dict[str, str]], int]:
    """(messages, first trained message) of one record, or a DataError naming `where` (the file
    and line or row) and what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is {_json_type(record)}, not a record with 'messages'")
    if record.get("messages") is not None:
        messages, first = _messages(record["messages"], where, "messages"), 0
    elif record.get("prompt") is not None and record.get("completion") is not None:
        parts = []
        for field, role in (("prompt", "user"), ("completion", "assistant")):
            value = record[field]
            parts.append([{"role": role, "content": value}] if isinstance(value, str) else
                         _messages(value, where, field))
        messages, first = parts[0] + parts[1], len(parts[0])
    else:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where} has no 'messages' (nor 'prompt' and 'completion'); its fields: {fields}. "
                        '--data.format chat reads records like {"messages": [{"role": "user", "content": '
                        '"..."}, {"role": "assistant", "content": "..."}]}')
    if not messages:
        raise DataError(f"{where}: 'messages' is empty; a conversation needs at least one assistant turn")
    if not any(m["role"] == "assistant" for m in messages[first:]):
        what = "its completion has" if first else "it has"
        raise DataError(f"{where}: the conversation has no assistant turn ({what} only "
                        f"{', '.join(sorted({m['role'] for m in messages[first:]}))}); there is nothing to "
                        "train on: fix or drop that record")
    return messages, first


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _reply(value: Any, prompt: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
    """The reply messages of a pair's `chosen` or `rejected`: a string is one assistant turn; a list
    of messages that starts with the prompt's messages is the whole conversation (those are cut);
    any other list is the reply itself, which must start with an assistant turn."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, where, field)
    if messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    elif messages and messages[0]["role"] != "assistant":
        raise DataError(f"{where}: {field!r} starts with a {messages[0]['role']} message that is not the prompt's; "
                        f"give the reply only, or the whole conversation starting with the prompt's messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: {field!r} holds no assistant reply after the prompt; there is nothing to "
                        "compare: fix or drop that record")
    return messages


def preference_pair(record: Any, where: str) -> tuple[list[dict[str, str]], list[dict[str, str]],
                                                         list[dict[str, str]]]:
    """(prompt, chosen reply, rejected reply) messages of one preference record, or a DataError
    naming `where` (the file and line or row) and what is wrong: a field missing, a reply that is
    not one, or chosen equal to rejected."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is {_json_type(record)}, not a record with 'prompt', 'chosen' and 'rejected'")
    missing = [f for f in PAIR_FIELDS if record.get(f) is None]
    if missing:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where} has no {' and no '.join(map(repr, missing))} (its fields: {fields}); "
                        "--data.format preference reads records holding 'prompt', 'chosen' and 'rejected', each a "
                        "string or a list of messages")
    value = record["prompt"]
    prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, where, "prompt")
    if not prompt:
        raise DataError(f"{where}: 'prompt' is empty; a pair needs a prompt to reply to")
    chosen, rejected = (_reply(record[f], prompt, where, f) for f in ("chosen", "rejected"))
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same reply, which teaches nothing; a preference "
                        "pair needs two different replies: fix or drop that record")
    return prompt, chosen, rejected


def as_unit(record: Any, where: str, kind: str | bool = "chat") -> str:
    """A record as the text of a source's unit: its conversation (or, with kind "preference", its
    pair) checked and serialized (JSON), which the cache builder's workers render
    (`ChatTemplate.render_units`)."""
    if kind == "preference":
        prompt, chosen, rejected = preference_pair(record, where)
        return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}, ensure_ascii=False)
    messages, first = conversation(record, where)
    return json.dumps({"messages": messages, "first": first}, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------
# The chat template


def template_of(tokenizer: Any, name: str) -> str:
    """The tokenizer's chat template, or one line saying it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"tokenizer {name!r} has no chat template, which --data.format chat renders conversations "
                        "with; use a tokenizer folder that has one (chat_template.jinja, or chat_template in "
                        "tokenizer_config.json), such as 'smollm2'")
    return template


class ChatTemplate:
    """The tokenizer's chat template, checked once: it renders conversations (as
    apply_chat_template does), its prefix property holds on a probe conversation, and its
    end-of-turn token and separator are known (see the module's docstring). Picklable: the cache
    builder's workers each hold one."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer, self.name = tokenizer, name
        self.template = template_of(tokenizer, name)
        self.end_of_turn, self.separator = self._probe()

    @property
    def digest(self) -> str:
        """sha256 of the template and of what decides the spans: part of a chat cache's key."""
        rule = f"{self.template}\nend={self.end_of_turn}\nseparator={self.separator}"
        return hashlib.sha256(rule.encode()).hexdigest()

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _probe(self) -> tuple[str | None, str]:
        """(end-of-turn token, separator), from a probe conversation; one line if the template
        cannot be rendered or its prefix property fails."""
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                 {"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": "V"},
                 {"role": "assistant", "content": "W"}]
        where = f"the chat template of tokenizer {self.name!r}"
        try:
            spans = self._reply_spans(probe, 0, where, separator="")
            text = self.render(probe)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  a template's own errors vary
            raise DataError(f"{where} cannot render a system/user/assistant conversation "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use a chat "
                            "template for these roles") from None
        reply = text[spans[0][0]:spans[0][1]]
        if _SENTINEL not in reply:
            raise DataError(f"{where} does not write a reply's content where its turn starts, so the replies "
                            "cannot be found; use a template that does")
        tail = reply[reply.index(_SENTINEL) + len(_SENTINEL):]
        specials = [t for t in self._special_tokens() if t and t in tail]
        if not specials:
            return None, ""
        end = min(specials, key=lambda t: (tail.index(t), -len(t)))
        return end, tail[tail.index(end) + len(end):]

    def _special_tokens(self) -> list[str]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        found = {t.content for t in decoder.values() if getattr(t, "special", False)}
        return sorted(found | set(getattr(self.tokenizer, "all_special_tokens", []) or []))

    def _reply_spans(self, messages: list[dict[str, str]], first: int, where: str,
                     separator: str | None = None) -> list[tuple[int, int]]:
        """The character spans of the trained assistant replies in render(messages): each from the
        end of its prompt (with the generation prompt) to its end-of-turn token included."""
        separator = self.separator if separator is None else separator
        text = self.render(messages)
        spans = []
        for i in range(first, len(messages)):
            if messages[i]["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (text.startswith(prompt) and text.startswith(upto) and len(upto) >= len(prompt)):
                raise DataError(f"{where}: the chat template does not render the conversation up to reply "
                                f"{i} (messages[:{i}] with the generation prompt, and messages[:{i + 1}]) as the "
                                "beginning of the whole, so that reply cannot be found; this template cannot be "
                                "trained on with a loss on replies (use --data.loss_on all, or another template)")
            a, b = len(prompt), len(upto)
            if separator and text[a:b].endswith(separator) and b - len(separator) > a:
                b -= len(separator)
            spans.append((a, b))
        return spans

    def render_unit(self, unit: str, loss_on: str, where: str = "a conversation") -> tuple[str, list[tuple[int, int]]]:
        """(text, spans) of a source's unit (`as_unit`): the rendered conversation, and the
        character spans that carry loss (the replies; with loss_on "all", the whole text)."""
        record = json.loads(unit)
        messages, first = record["messages"], record["first"]
        try:
            if loss_on == "all":
                text = self.render(messages)
                return text, [(0, len(text))]
            return self.render(messages), self._reply_spans(messages, first, where)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  the template's raise_exception, or any jinja error
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: the chat template of tokenizer {self.name!r} refuses the conversation "
                            f"({message}); fix or drop that record") from None


    def render_units(self, unit: str, loss_on: str, where: str = "a conversation") -> list[tuple[str, list[tuple[int, int]]]]:
        """[(text, spans)] of a source's unit: one conversation (`render_unit`), or a preference
        pair's two sides, chosen then rejected, each rendered as prompt + reply and cut after the
        reply's end-of-turn token, with the reply's spans."""
        record = json.loads(unit)
        if "chosen" not in record:
            return [self.render_unit(unit, loss_on, where)]
        prompt, out = record["prompt"], []
        for side in ("chosen", "rejected"):
            messages = prompt + record[side]
            try:
                text, spans = self.render(messages), self._reply_spans(messages, len(prompt), where)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001  the template's raise_exception, or any jinja error
                message = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"{where}: the chat template of tokenizer {self.name!r} refuses the {side} side of "
                                f"the pair ({message}); fix or drop that record") from None
            out.append((text[:spans[-1][1]], spans))
        return out


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """(n,) bool: whether token j (its characters offsets[j]) carries loss: any character of it
    lies in a span; a token of no characters, where it starts. Token 0 never does."""
    n = len(offsets)
    mask = np.zeros(n, dtype=bool)
    if not n:
        return mask
    at = np.asarray(offsets, dtype=np.int64).reshape(n, 2)
    starts, ends = at[:, 0], at[:, 1]
    empty = ends <= starts
    for a, b in spans:
        mask |= np.where(empty, (starts >= a) & (starts < b), (starts < b) & (ends > a))
    mask[0] = False
    return mask


def encode(template: ChatTemplate, backend: Any, unit: str, loss_on: str,
           where: str = "a conversation") -> tuple[list[int], np.ndarray, str, list[tuple[int, int]]]:
    """(ids, mask, text, offsets) of one unit: `backend` is the tokenizer's Rust tokenizer
    (`tokenizer.backend_tokenizer`, special tokens recognized), which gives the ids that
    apply_chat_template gives."""
    text, spans = template.render_unit(unit, loss_on, where)
    encoding = backend.encode(text, add_special_tokens=False)
    return encoding.ids, token_mask(encoding.offsets, spans), text, encoding.offsets
