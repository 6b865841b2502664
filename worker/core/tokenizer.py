"""Text <-> token ids for a model, with its end-of-sequence ids and chat template, from any form we accept.

Sources: a token_config / Hugging Face folder (`tokenizer.json`; else `vocab.json` + `merges.txt` with
Qwen2 pre-tokenization; else Qwen-7B v1 `qwen.tiktoken`), or a `.gguf` file's tokenizer metadata.
Everything is built once at load; encode/decode go straight to the `tokenizers` library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import gguf
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from worker.core.bpe import SplitStyle, add_tokens_at_ids, byte_level_tokenizer
from worker.core.chat_template import ChatTemplate, select_template
from worker.core.gguf_vocab import end_of_generation_ids, gguf_backend, read_gguf_vocab
from worker.core.tiktoken_bpe import QWEN_END_TOKENS, QWEN_TIKTOKEN_FILE, qwen_tiktoken_tokenizer

TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        eos_token_ids: Iterable[int],
        bos_token_id: int | None,
        chat_template: ChatTemplate,
        add_bos_token: bool = False,
    ) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token  # the model expects BOS first even when its template omits it
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # decode() leaves these out.
        self.special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        # SentencePiece byte-fallback tokens <0xNN>: a run of them decodes as one unit (all valid UTF-8
        # or all U+FFFD), which streaming has to respect. Empty for byte-level vocabularies.
        self.byte_token_ids = frozenset(
            token_id
            for byte in range(256)
            if (token_id := backend.token_to_id(f"<0x{byte:02X}>")) is not None
        )
        self._backend = backend

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it map to their ids. Adds no BOS/EOS."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a rendered prompt, with BOS first when the model wants it and the template left it out."""
        ids = self.encode(text)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        return self._backend.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(source: str | Path) -> Tokenizer:
    path = Path(source)
    if path.is_dir():
        return _load_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(gguf.GGUFReader(path), origin=str(path))
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source {path} does not exist")
    raise ValueError(f"tokenizer source {path} is neither a token_config / model folder nor a .gguf file")


def tokenizer_from_gguf(reader: gguf.GGUFReader, origin: str) -> Tokenizer:
    """The tokenizer of an already opened GGUF file (opening one takes seconds: share the reader)."""
    vocab = read_gguf_vocab(reader, origin)
    token_of = {name: vocab.tokens[token_id] for name, token_id in vocab.special_ids.items()}
    template_tokens = {
        f"{name}_token": token_of[name] for name in ("bos", "eos", "unk", "pad") if name in token_of
    }
    template = (
        ChatTemplate(
            vocab.chat_template, origin=f"{origin} (tokenizer.chat_template)", special_tokens=template_tokens
        )
        if vocab.chat_template
        else ChatTemplate.chatml()
    )
    return Tokenizer(
        gguf_backend(vocab),
        eos_token_ids=end_of_generation_ids(vocab),
        bos_token_id=vocab.special_ids.get("bos"),
        chat_template=template,
        add_bos_token=vocab.add_bos,
    )


def _load_folder(folder: Path) -> Tokenizer:
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    configs = [
        tokenizer_config,
        _read_json(folder / "generation_config.json"),
        _read_json(folder / "config.json"),
    ]
    backend, implied_eos = _folder_backend(folder, tokenizer_config)
    special_tokens = {
        name: text
        for name in TEMPLATE_TOKEN_NAMES
        if (text := _token_text(tokenizer_config.get(name))) is not None
    }
    eos_ids = _declared_ids(backend, configs, "eos", folder) | {
        _id_of(backend, text, folder) for text in implied_eos
    }
    if not eos_ids:
        raise ValueError(
            f"{folder}: no end-of-sequence token declared (eos_token in tokenizer_config.json "
            "or eos_token_id in generation_config.json / config.json)"
        )
    bos_ids = _declared_ids(backend, configs, "bos", folder, first_only=True)
    bos_id = next(iter(bos_ids), None)
    return Tokenizer(
        backend,
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        chat_template=_folder_chat_template(folder, tokenizer_config, special_tokens),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", _backend_adds_bos(backend, bos_id))),
    )


def _folder_backend(folder: Path, tokenizer_config: dict) -> tuple[BackendTokenizer, tuple[str, ...]]:
    """The tokenizer itself, and the end tokens its form implies when no config declares them."""
    if (folder / "tokenizer.json").is_file():
        return BackendTokenizer.from_file(str(folder / "tokenizer.json")), ()
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        backend = byte_level_tokenizer(BPE.from_file(str(vocab), str(merges)), SplitStyle.QWEN2)
        add_tokens_at_ids(
            backend, _configured_added_tokens(tokenizer_config), str(folder / "tokenizer_config.json")
        )
        return backend, ()
    if (folder / QWEN_TIKTOKEN_FILE).is_file():
        return qwen_tiktoken_tokenizer(folder / QWEN_TIKTOKEN_FILE), QWEN_END_TOKENS
    raise FileNotFoundError(
        f"{folder}: no tokenizer found; expected tokenizer.json, or vocab.json + merges.txt, "
        f"or {QWEN_TIKTOKEN_FILE}"
    )


def _configured_added_tokens(tokenizer_config: dict) -> list[tuple[int, AddedToken]]:
    return [
        (
            int(token_id),
            AddedToken(
                entry["content"],
                special=bool(entry.get("special", False)),
                normalized=bool(entry.get("normalized", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                single_word=bool(entry.get("single_word", False)),
            ),
        )
        for token_id, entry in tokenizer_config.get("added_tokens_decoder", {}).items()
    ]


def _folder_chat_template(
    folder: Path, tokenizer_config: dict, special_tokens: dict[str, str]
) -> ChatTemplate:
    """Newer transformers save the template beside the config; older ones inside tokenizer_config.json."""
    jinja_file, json_file = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja_file.is_file():
        source, origin = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    elif json_file.is_file():
        origin = str(json_file)
        source = select_template(_read_json(json_file).get("chat_template"), origin)
    elif "chat_template" in tokenizer_config:
        origin = str(folder / "tokenizer_config.json")
        source = select_template(tokenizer_config["chat_template"], origin)
    else:
        return ChatTemplate.chatml()
    return ChatTemplate(source, origin=origin, special_tokens=special_tokens)


def _declared_ids(
    backend: BackendTokenizer, configs: list[dict], kind: str, folder: Path, *, first_only: bool = False
) -> set[int]:
    """`{kind}_token` (text) and `{kind}_token_id` (int or list) from the configs, most specific first."""
    found: list[int] = []
    for config in configs:
        text = _token_text(config.get(f"{kind}_token"))
        if text is not None:
            found.append(_id_of(backend, text, folder))
        declared = config.get(f"{kind}_token_id")
        found.extend(declared if isinstance(declared, list) else [] if declared is None else [declared])
        if first_only and found:
            break
    return {int(token_id) for token_id in found}


def _token_text(value: object) -> str | None:
    """A special token setting: plain text, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_of(backend: BackendTokenizer, text: str, folder: Path) -> int:
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{folder}: special token {text!r} named in the config is not in the vocabulary")
    return token_id


def _backend_adds_bos(backend: BackendTokenizer, bos_id: int | None) -> bool:
    """Whether the tokenizer's own post-processor puts BOS first (tokenizer.json of Llama-style models)."""
    return bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return content
