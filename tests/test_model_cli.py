"""Tokenizer and `python -m m1model.generate` on a tiny random checkpoint with a byte-level tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from model_utils import random_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from m1model import M1Config
from m1model.generate import main
from m1model.tokenizer import StreamDecoder, Tokenizer

TINY = M1Config.preset("tiny")  # vocab 256: one token per byte


def byte_tokenizer(path) -> None:
    """A 256-token byte-level BPE without merges, written as tokenizer.json."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ckpt")
    random_model(TINY, seed=31).save_pretrained(path)
    byte_tokenizer(path)
    return path


def test_tokenizer_round_trip_and_stream_decoder(checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    text = "Grüße, 世界!"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert pieces[2] == "" and pieces[3] == "ü", "a half-received character is held back"
    assert Tokenizer.from_pretrained(checkpoint / "nowhere") is None


def test_cli_streams_the_greedy_continuation(checkpoint):
    prompt = "Hello, world"
    model = random_model(TINY, seed=31)
    tok = Tokenizer.from_pretrained(checkpoint)
    expect = model.generate([tok.encode(prompt)], max_new_tokens=12, eos_token_id=()).tokens[0]
    run = subprocess.run(
        [sys.executable, "-m", "m1model.generate", "--model", str(checkpoint), "--prompt", prompt,
         "--max-new-tokens", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == tok.decode(expect) + "\n"
    assert "[12 tokens, stopped: max_new_tokens" in run.stderr


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def test_cli_writes_each_token_as_it_comes(checkpoint, monkeypatch, capsys):
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["--model", str(checkpoint), "--prompt-ids", "72 101 108", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--top-k", "20", "--seed", "3"]) == 0
    model = random_model(TINY, seed=31)
    expect = model.generate([[72, 101, 108]], max_new_tokens=6, temperature=0.9, top_k=20, eos_token_id=(),
                            generator=torch.Generator().manual_seed(3)).tokens[0]
    tok = Tokenizer.from_pretrained(checkpoint)
    assert len(out.writes) == 7, "one write per token, then the newline"
    assert "".join(out.writes) == tok.decode(expect) + "\n"


def test_cli_text_prompt_needs_a_tokenizer(tmp_path, capsys):
    random_model(TINY).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
