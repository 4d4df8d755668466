"""Procedural tasks with verifiable rewards, and a character tokenizer for them.

Text format (one character per token, so a tiny model needs no downloaded
tokenizer). A prompt ends with "="; the completion is the answer followed by
the end marker END = "." (the tokenizer's EOS token):

    addition   "347+85="         -> "432."        (reverse=True: "234.", digits least significant first)
    sorting    "sort:5,31,9="    -> "5,9,31."
    countdown  "make14:2,3,4="   -> "2*(3+4)."    (any expression that uses each number exactly
                                                  once and equals the target scores, e.g. "4*2+3*2" does not:
                                                  it uses 2 twice)

Rewards are plain callables `reward(prompt, completion) -> float` (the trainer
accepts any such callable). Every task provides
    format_reward  1.0 when the completion is a well-formed answer followed by END and nothing else
    accuracy_reward 1.0 when it is well-formed and correct (the exact answer; for countdown, any
                    valid expression)
    reward         accuracy_reward + format_weight * format_reward (format_weight 0.1): a right
                    answer scores 1.1, a well-formed wrong one 0.1, anything else 0.
The answer is recomputed from the prompt, so rewards need no lookup table.

Splits: a problem belongs to the held-out evaluation split iff a hash of its
canonical key (addition: the unordered pair; sorting: the sorted multiset;
countdown: target and sorted numbers) falls below `eval_fraction`. The split
depends on the key only -- not on the seed or the task's size settings -- so
train and eval never share a problem, even across seeds and curricula.
Generation is deterministic given (task, split, seed).
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

END = "."  # end-of-answer marker in text; the tokenizer maps it to EOS
TASK_ALPHABET = "0123456789+-*/()=,:>@ abcdefghijklmnopqrstuvwxyz"


class CharTokenizer:
    """Character-level tokenizer over a fixed alphabet with pad / bos / eos ids.

    ids: 0 = pad, 1 = bos, 2 = eos (rendered as END in text), then the alphabet.
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    specials = ("<pad>", "<bos>", END)

    def __init__(self, alphabet: str = TASK_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer: alphabet has repeated characters")
        if END in alphabet:
            raise ValueError(f"CharTokenizer: the alphabet must not contain the end marker {END!r}")
        self.alphabet = alphabet
        self._ids = {c: i + len(self.specials) for i, c in enumerate(alphabet)}
        self._ids[END] = self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.specials) + len(self.alphabet)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Ids of `text` (END becomes eos); `bos` prepends the bos id."""
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the alphabet") from None
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`: pad and bos are dropped, eos becomes END; unknown ids raise ValueError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i in (self.pad_id, self.bos_id):
                continue
            if i == self.eos_id:
                out.append(END)
            elif len(self.specials) <= i < self.vocab_size:
                out.append(self.alphabet[i - len(self.specials)])
            else:
                raise ValueError(f"CharTokenizer.decode: id {i} is outside [0, {self.vocab_size})")
        return "".join(out)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = True, padding_side: str = "left"):
        """Pads encoded texts to one length. Returns (ids [B, L] int64, mask [B, L] bool, True on tokens).

        Left padding (default) lines prompts up at their last token for batched generation.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"CharTokenizer.encode_batch: padding_side must be 'left' or 'right', "
                             f"got {padding_side!r}")
        seqs = [self.encode(t, bos=bos) for t in texts]
        L = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), L), dtype=torch.bool)
        for b, s in enumerate(seqs):
            cols = slice(L - len(s), L) if padding_side == "left" else slice(0, len(s))
            ids[b, cols] = torch.tensor(s, dtype=torch.int64)
            mask[b, cols] = True
        return ids, mask

    def encode_pair(self, prompt: str, completion: str, *, bos: bool = True):
        """One SFT example: (ids [L] int64, target_mask [L] bool, True on the completion's tokens)."""
        p, c = self.encode(prompt, bos=bos), self.encode(completion)
        ids = torch.tensor(p + c, dtype=torch.int64)
        target = torch.zeros(len(p) + len(c), dtype=torch.bool)
        target[len(p):] = True
        return ids, target


@dataclass(frozen=True)
class Problem:
    prompt: str   # ends with "="
    answer: str   # a correct answer without END (the demonstration)
    key: tuple    # canonical identity; equal keys = the same problem for the split


def _split_hash(task: str, key: tuple) -> float:
    digest = hashlib.blake2b(f"{task}|{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Task(ABC):
    """A procedural task: deterministic problems, disjoint splits, verifiable rewards."""

    name: str
    answer_re: re.Pattern  # the shape of a well-formed answer (before END)

    def __init__(self, *, eval_fraction: float = 0.1, format_weight: float = 0.1):
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"{type(self).__name__}: eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.eval_fraction = eval_fraction
        self.format_weight = format_weight

    # -- what each task defines

    @abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """One problem from the whole space (either split)."""

    @abstractmethod
    def check(self, prompt: str, answer: str) -> bool:
        """Whether a well-formed `answer` (no END) solves `prompt`."""

    def well_formed(self, answer: str) -> bool:
        return self.answer_re.fullmatch(answer) is not None

    # -- splits and data

    def split_of(self, problem: Problem) -> str:
        return "eval" if _split_hash(self.name, problem.key) < self.eval_fraction else "train"

    def iter_problems(self, split: str, seed: int) -> Iterator[Problem]:
        """An endless, deterministic stream of problems of `split` ("train" or "eval"); may repeat."""
        if split not in ("train", "eval"):
            raise ValueError(f"{self.name}: split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        while True:
            p = self.sample(rng)
            if self.split_of(p) == split:
                yield p

    def problems(self, split: str, n: int, seed: int, *, unique: bool = True) -> list[Problem]:
        """`n` problems of `split`, distinct keys when `unique` (ValueError if the split is too small)."""
        out, seen, misses = [], set(), 0
        for p in self.iter_problems(split, seed):
            if unique and p.key in seen:
                misses += 1
                if misses > 1000 + 20 * n:   # no new problem in a long while: the split is exhausted
                    raise ValueError(f"{self.name}: found only {len(out)} distinct {split} problems of {n} "
                                     f"asked (the problem space is too small for this many)")
                continue
            misses = 0
            seen.add(p.key)
            out.append(p)
            if len(out) == n:
                return out
        return out

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """(prompt, completion) pairs from the TRAIN split for an SFT warm start."""
        return [(p.prompt, p.answer + END) for p in self.problems("train", n, seed, unique=False)]

    # -- rewards: callables (prompt, completion) -> float

    def _answer_of(self, completion: str) -> str | None:
        """The answer if `completion` is exactly answer + END with a well-formed answer, else None."""
        if not completion.endswith(END) or completion.count(END) != 1:
            return None
        answer = completion[:-1]
        return answer if self.well_formed(answer) else None

    def format_reward(self, prompt: str, completion: str) -> float:
        return float(self._answer_of(completion) is not None)

    def accuracy_reward(self, prompt: str, completion: str) -> float:
        answer = self._answer_of(completion)
        return float(answer is not None and self.check(prompt, answer))

    def reward(self, prompt: str, completion: str) -> float:
        return self.accuracy_reward(prompt, completion) + self.format_weight * self.format_reward(prompt, completion)


def _parse_prompt(task: str, pattern: re.Pattern, prompt: str) -> re.Match:
    m = pattern.fullmatch(prompt)
    if m is None:
        raise ValueError(f"{task}: not a {task} prompt: {prompt!r}")
    return m


def _random_int(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


class AdditionTask(Task):
    """a+b= with a and b of min_digits..max_digits digits; `reverse` writes the sum backwards."""

    name = "addition"
    answer_re = re.compile(r"[0-9]+")
    _prompt_re = re.compile(r"([0-9]+)\+([0-9]+)=")

    def __init__(self, min_digits: int = 1, max_digits: int = 3, *, reverse: bool = False, **kw):
        super().__init__(**kw)
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"AdditionTask: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        self.min_digits, self.max_digits, self.reverse = min_digits, max_digits, reverse

    def _answer(self, a: int, b: int) -> str:
        s = str(a + b)
        return s[::-1] if self.reverse else s

    def sample(self, rng: random.Random) -> Problem:
        a = _random_int(rng, rng.randint(self.min_digits, self.max_digits))
        b = _random_int(rng, rng.randint(self.min_digits, self.max_digits))
        return Problem(f"{a}+{b}=", self._answer(a, b), (min(a, b), max(a, b)))

    def check(self, prompt: str, answer: str) -> bool:
        m = _parse_prompt(self.name, self._prompt_re, prompt)
        return answer == self._answer(int(m[1]), int(m[2]))


class SortingTask(Task):
    """sort:<n comma-separated numbers>= -> the numbers in ascending order."""

    name = "sorting"
    answer_re = re.compile(r"[0-9]+(,[0-9]+)*")
    _prompt_re = re.compile(r"sort:([0-9]+(?:,[0-9]+)*)=")

    def __init__(self, min_len: int = 2, max_len: int = 5, max_value: int = 99, **kw):
        super().__init__(**kw)
        if not 1 <= min_len <= max_len or max_value < 0:
            raise ValueError(f"SortingTask: need 1 <= min_len <= max_len and max_value >= 0, "
                             f"got {min_len}, {max_len}, {max_value}")
        self.min_len, self.max_len, self.max_value = min_len, max_len, max_value

    def sample(self, rng: random.Random) -> Problem:
        nums = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))]
        s = sorted(nums)
        return Problem(f"sort:{','.join(map(str, nums))}=", ",".join(map(str, s)), tuple(s))

    def check(self, prompt: str, answer: str) -> bool:
        nums = [int(x) for x in _parse_prompt(self.name, self._prompt_re, prompt)[1].split(",")]
        return answer == ",".join(map(str, sorted(nums)))


# -- countdown: arithmetic expressions over the given numbers

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_TOKEN_RE = re.compile(r"[0-9]+|[-+*/()]")


def _render(node) -> str:
    """Minimal-parenthesis text of an expression tree (int leaves, (op, left, right) nodes)."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    lt, rt = _render(left), _render(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        lt = f"({lt})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op in "-/")):
        rt = f"({rt})"
    return f"{lt}{op}{rt}"


class _ExprParser:
    """Recursive descent over + - * / ( ) and non-negative integers; exact Fraction values.

    expr := term (('+'|'-') term)*;  term := atom (('*'|'/') atom)*;  atom := INT | '(' expr ')'
    Raises ValueError on malformed text; ZeroDivisionError on division by zero.
    """

    def __init__(self, text: str):
        self.tokens = _TOKEN_RE.findall(text)
        if "".join(self.tokens) != text:
            raise ValueError("unexpected character")
        self.pos, self.numbers = 0, []

    def parse(self) -> Fraction:
        value = self._expr(0)
        if self.pos != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self, depth) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth) -> Fraction:
        value = self._atom(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._atom(depth)
            value = value * rhs if op == "*" else value / rhs
        return value

    def _atom(self, depth) -> Fraction:
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.pos += 1
        if tok == "(":
            if depth > 32:
                raise ValueError("nested too deeply")
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ValueError("missing )")
            self.pos += 1
            return value
        if tok.isdigit() and (tok == "0" or not tok.startswith("0")):
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ValueError(f"unexpected {tok!r}")


class CountdownTask(Task):
    """make<target>:<numbers>= -> an expression using every number exactly once that equals target.

    Problems are generated from a random expression over the numbers (+, -, *,
    and / only when exact; intermediate values stay positive), so each has a
    solution, which is the demonstration. Any other valid expression scores too.
    """

    name = "countdown"
    answer_re = re.compile(r"[0-9+\-*/()]{1,64}")
    _prompt_re = re.compile(r"make([0-9]+):([0-9]+(?:,[0-9]+)*)=")

    def __init__(self, num_numbers: int = 3, max_number: int = 10, max_target: int = 100, **kw):
        super().__init__(**kw)
        if num_numbers < 1 or max_number < 1 or max_target < 1:
            raise ValueError("CountdownTask: num_numbers, max_number and max_target must be >= 1")
        self.num_numbers, self.max_number, self.max_target = num_numbers, max_number, max_target

    def sample(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            nodes = [(n, Fraction(n)) for n in nums]                # (tree, value)
            while len(nodes) > 1:
                (ta, va), (tb, vb) = nodes.pop(rng.randrange(len(nodes))), nodes.pop(rng.randrange(len(nodes)))
                ops = ["+", "*"] + (["-"] if va > vb else [])
                if vb != 0 and (va / vb).denominator == 1:
                    ops.append("/")
                op = rng.choice(ops)
                value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else None}[op]
                nodes.append(((op, ta, tb), value))
            tree, value = nodes[0]
            if value.denominator == 1 and 1 <= value <= self.max_target:
                target = int(value)
                return Problem(f"make{target}:{','.join(map(str, nums))}=", _render(tree),
                               (target, tuple(sorted(nums))))

    def well_formed(self, answer: str) -> bool:
        if self.answer_re.fullmatch(answer) is None:
            return False
        try:
            _ExprParser(answer).parse()
        except ValueError:
            return False
        except ZeroDivisionError:
            return True   # a well-formed expression with a wrong value
        return True

    def check(self, prompt: str, answer: str) -> bool:
        m = _parse_prompt(self.name, self._prompt_re, prompt)
        target, nums = int(m[1]), sorted(int(x) for x in m[2].split(","))
        parser = _ExprParser(answer)
        try:
            value = parser.parse()
        except (ValueError, ZeroDivisionError):
            return False
        return value == target and sorted(parser.numbers) == nums


TASKS = {"addition": AdditionTask, "sorting": SortingTask, "countdown": CountdownTask}


def make_task(name: str, **kwargs) -> Task:
    """The built-in task `name` ("addition", "sorting", "countdown") with its settings."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"make_task: unknown task {name!r}; built-in tasks: {sorted(TASKS)}") from None
    return cls(**kwargs)
