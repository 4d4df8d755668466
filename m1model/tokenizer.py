"""The checkpoint's tokenizer (tokenizer.json, through the `tokenizers` package) and streaming decode."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """encode / decode with the tokenizer.json of a checkpoint directory."""

    def __init__(self, file: str | Path, eos_token: str | None = None) -> None:
        self._tok = _HFTokenizer.from_file(str(file))
        self.eos_token_id = self._tok.token_to_id(eos_token) if eos_token else None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer | None":
        """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        eos = None
        config = path / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            if isinstance(eos, dict):  # {"content": "</s>", ...}
                eos = eos.get("content")
        return cls(path / "tokenizer.json", eos_token=eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns a growing token list into text increments.

    Decodes the whole list each time and emits what was added, holding back an
    unfinished multi-byte character (decoders show it as U+FFFD until complete).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new
