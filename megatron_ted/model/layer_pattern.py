"""`--moe-layer-freq` as Megatron-LM takes it: an int N (layer i is MoE when i % N == 0) or a
pattern string of 0/1 per layer, e.g. "([0]+[1]*23)" (a dense first layer) or "[0,1,1,1]";
`--window-attn-skip-freq` takes the same forms (which layers keep full attention).

Megatron-LM evaluates the string as Python; here a small parser accepts exactly the list
expressions such patterns use — list literals of integers, `+` (concatenation), `*` (repetition by
an integer) and parentheses — and nothing else, so no user text is ever executed.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _tokens(text: str) -> list[str]:
    out = []
    for number, symbol in _TOKEN.findall(text):
        if symbol and symbol not in "[],+*()":
            raise ValueError(f"unexpected {symbol!r}")
        out.append(number or symbol)
    return out


class _Parser:
    """expr := term ('+' term)* ; term := atom ('*' INT)* | INT '*' atom ; atom := list | '(' expr ')'."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'more'} at token {self.pos + 1}, got {tok!r}")
        self.pos += 1
        return tok

    def expr(self) -> list[int] | int:
        value = self.term()
        while self.peek() == "+":
            self.take()
            right = self.term()
            if not (isinstance(value, list) and isinstance(right, list)):
                raise ValueError("'+' joins two lists")
            value = value + right
        return value

    def term(self) -> list[int] | int:
        value = self.atom()
        while self.peek() == "*":
            self.take()
            right = self.atom()
            if isinstance(value, list) == isinstance(right, list):
                raise ValueError("'*' repeats a list by an integer")
            value = value * right
        return value

    def atom(self) -> list[int] | int:
        tok = self.peek()
        if tok is not None and tok.isdigit():
            return int(self.take())
        if tok == "(":
            self.take()
            value = self.expr()
            self.take(")")
            return value
        self.take("[")
        items = []
        while self.peek() != "]":
            tok = self.take()
            if not tok.isdigit():
                raise ValueError(f"list items are integers, got {tok!r}")
            items.append(int(tok))
            if self.peek() != "]":
                self.take(",")
        self.take("]")
        return items


def parse_layer_pattern(text: str) -> list[int]:
    """The list a pattern string denotes; raises ValueError on anything but list arithmetic."""
    parser = _Parser(_tokens(text))
    value = parser.expr()
    if parser.peek() is not None:
        raise ValueError(f"unexpected {parser.peek()!r} after the expression")
    if not isinstance(value, list):
        raise ValueError("the expression is not a list")
    return value


def freq_or_pattern(value, num_layers: int, flag: str, one: str, zero: str) -> int | list[int]:
    """A Megatron-LM layer flag as given (int, digit string, pattern string or 0/1 list) -> an int >= 1
    or a 0/1 list of length num_layers (`one`, `zero`: what 1 and 0 mean). ValueError naming `flag`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
        return value
    if isinstance(value, str):
        try:
            pattern = parse_layer_pattern(value)
        except ValueError as err:
            raise ValueError(f"{flag} {value!r} is not an int or a list pattern such as "
                             f"\"([0]+[1]*{max(num_layers - 1, 1)})\" ({err})") from None
    else:
        pattern = list(value)
    if any(v not in (0, 1) for v in pattern):
        raise ValueError(f"{flag} {value!r}: every entry must be 0 ({zero}) or 1 ({one})")
    if len(pattern) != num_layers:
        raise ValueError(f"{flag} {value!r} has {len(pattern)} entries but --num-layers is "
                         f"{num_layers}; give one 0/1 per layer")
    return pattern


def moe_layer_freq(value, num_layers: int) -> int | list[int]:
    """--moe-layer-freq: an int N (layer i is MoE when i % N == 0) or a 0/1 list (1: MoE)."""
    pattern = freq_or_pattern(value, num_layers, "--moe-layer-freq", "MoE", "dense")
    if isinstance(pattern, list) and not any(pattern):
        raise ValueError(f"--moe-layer-freq {value!r} has no MoE layer (no 1); drop --num-experts for a dense model")
    return pattern


def window_attn_skip_freq(value, num_layers: int) -> int | list[int] | None:
    """--window-attn-skip-freq: an int N (1-based layers N, 2N, ... keep full attention) or a 0/1
    list (1: sliding window, 0: full attention), as Megatron-LM; None: every layer windowed."""
    if value is None:
        return None
    return freq_or_pattern(value, num_layers, "--window-attn-skip-freq", "sliding window", "full attention")
