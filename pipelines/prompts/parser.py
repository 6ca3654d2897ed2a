"""A1111 prompt syntax: attention weights, BREAK, scheduling and alternation (`pipelines.prompts.encoding` turns
the result into 77-token chunks and CLIP embeddings).

Pure Python (no torch), so the UI can parse and count tokens without it. Semantics follow AUTOMATIC1111's
`modules/prompt_parser.py` (`parse_prompt_attention`, `get_learned_conditioning_prompt_schedules`).
Deviations, all on inputs where A1111 crashes or misbehaves, are listed in the docstring of the function
concerned.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_WEIGHT = 1e6  # weights are clamped to [MIN_WEIGHT, MAX_WEIGHT] in magnitude (zero stays zero)
MIN_WEIGHT = 1e-6

_RE_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_MAX_DEPTH = 100  # deeper bracket nesting makes the schedule parser give up: the prompt is used literally
Timeline = Literal["a1111", "legacy"]
TIMELINES: tuple[str, ...] = ("a1111", "legacy")


# ---------------------------------------------------------------- attention weights: (a) [a] (a:1.3) BREAK


def _clamp(weight: float) -> float:
    """Keep a weight finite and, unless it is zero, out of denormal range (only absurd nesting hits this)."""
    size = min(abs(weight), MAX_WEIGHT)
    if size == 0.0:
        return 0.0
    return max(size, MIN_WEIGHT) if weight > 0 else -max(size, MIN_WEIGHT)


def _to_weight(number: str) -> float | None:
    """An explicit `(x:w)` weight, clamped; None when `w` is not a number (such as "1.2.3" or ".")."""
    try:
        return _clamp(float(number))
    except ValueError:
        return None


def _multiply(res: list[list[Any]], start: int, multiplier: float) -> None:
    """Multiply the weights of fragments `start:` (BREAK markers, weight None, are left alone)."""
    for item in res[start:]:
        weight = item[1]
        if weight is not None:
            weight *= multiplier
            item[1] = weight if MIN_WEIGHT <= abs(weight) <= MAX_WEIGHT else _clamp(weight)


def _repeat(weight: float, multiplier: float, times: int) -> float:
    """`weight` multiplied `times` times in a row, clamping each time, stopping once the clamp holds it."""
    for _ in range(times):
        new = _clamp(weight * multiplier)
        if new == weight:
            break
        weight = new
    return weight


def _close_unbalanced(res: list[list[Any]], rounds: list[int], squares: list[int]) -> None:
    """Apply unclosed "(" then "[" to the rest of the text: the same products as A1111's loop, in one sweep."""
    for item_index, item in enumerate(res):
        if item[1] is not None:
            weight = _repeat(item[1], ROUND_MULTIPLIER, bisect.bisect_right(rounds, item_index))
            item[1] = _repeat(weight, SQUARE_MULTIPLIER, bisect.bisect_right(squares, item_index))


def _append_text(res: list[list[Any]], text: str) -> None:
    """Append plain text, splitting out uppercase `BREAK` words as markers (weight None)."""
    for i, part in enumerate(_RE_BREAK.split(text)):
        if i > 0:
            res.append([BREAK, None])
        res.append([part, 1.0])


def _merge(res: list[list[Any]]) -> list[tuple[str, float]]:
    """Merge runs of equal weight (never markers, never into the text "BREAK"); markers get weight -1.0."""
    out: list[list[Any]] = []
    for text, weight in res:
        prev = out[-1] if out else None
        if prev and weight is not None and prev[1] == weight and prev[0] + text != BREAK:
            prev[0] += text
        else:
            out.append([text, weight])
    return [(text, -1.0 if weight is None else weight) for text, weight in out] or [("", 1.0)]


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs with A1111's `parse_prompt_attention` rules.

    `(x)` x1.1, `[x]` /1.1, `(x:w)` xw; nesting multiplies; an unclosed opener weights the rest of the
    text; a stray closer (and a stray `:`) stays literal text; `\\(` `\\)` `\\[` `\\]` `\\\\` are literal,
    a lone backslash vanishes; uppercase `BREAK` as a word becomes `(BREAK, -1.0)`; adjacent equal weights
    merge; "" gives `[("", 1.0)]`. Deviations where A1111 crashes or misbehaves: an explicit weight that
    is not a number (`(x:1.2.3)`) is literal text closed by a plain `)`; weights are clamped to
    +-[1e-6, 1e6]; BREAK inside brackets stays a marker (A1111 multiplies its -1 into plain text).
    """
    res: list[list[Any]] = []
    rounds: list[int] = []
    squares: list[int] = []
    for match in _RE_ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(res))
        elif token == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            start, multiplier = rounds.pop(), _to_weight(weight)
            if multiplier is None:  # "(x:1.2.3)": A1111 raises; keep ":1.2.3" as text, close like ")"
                _append_text(res, token[:-1])
                multiplier = ROUND_MULTIPLIER
            _multiply(res, start, multiplier)
        elif token == ")" and rounds:
            _multiply(res, rounds.pop(), ROUND_MULTIPLIER)
        elif token == "]" and squares:
            _multiply(res, squares.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(res, token)
    _close_unbalanced(res, rounds, squares)
    return _merge(res)


# ---------------------------------------------------------------- scheduling: [a:b:when] [a:when] [a|b]


@dataclass(frozen=True)
class _Scheduled:
    """`[before:after:when]`; `before` is None for `[after:when]`."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when: float
    dotted: bool = False
    """Whether `when` was written with a "." (A1111's default timeline reads it as a fraction then)."""


@dataclass(frozen=True)
class _Alternate:
    """`[a|b|c]`: option (step - 1) % len at each step."""

    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Scheduled | _Alternate
_Item = tuple[list[_Node], int]


class _NoParse(Exception):
    """The schedule grammar does not match: the whole prompt is used literally, as in A1111."""


class _ScheduleParser:
    """Memoised recursive descent mirroring A1111's lark grammar for scheduled and alternating prompts.

    start: (prompt | stray "[](): ")*; prompt: (emphasized | scheduled | alternate | plain)*;
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]";
    scheduled: "[" [prompt ":"] prompt ":" NUMBER "]"; alternate: "[" prompt ("|" [prompt])+ "]".
    """

    def __init__(self, text: str):
        self.text, self.depth = text, 0
        self._prompts: dict[int, _Item] = {}
        self._brackets: dict[int, _Item | None] = {}

    def parse(self) -> list[_Node]:
        """The node list for the whole text, stray brackets kept as text; raises _NoParse."""
        out: list[_Node] = []
        pos = 0
        while pos < len(self.text):
            nodes, pos = self.prompt(pos)
            out.extend(nodes)
            if pos < len(self.text):
                if self.text[pos] == "|":
                    raise _NoParse("'|' outside an alternation")
                out.append(self.text[pos])
                pos += 1
        return out

    def _at(self, pos: int, char: str) -> bool:
        """Whether the text has `char` at `pos`."""
        return pos < len(self.text) and self.text[pos] == char

    def prompt(self, pos: int) -> _Item:
        """The longest `prompt` starting at `pos`: its nodes and where it stops."""
        if pos in self._prompts:
            return self._prompts[pos]
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _NoParse("nesting too deep")
        start, nodes = pos, []
        while pos < len(self.text) and self.text[pos] not in "])|:":
            if self.text[pos] in "([":
                item = self.bracket(pos)
                if item is None:
                    break
                nodes.extend(item[0])
                pos = item[1]
                continue
            match = _RE_PLAIN.match(self.text, pos)
            if match is None:
                raise _NoParse("lone backslash")
            nodes.append(match.group())
            pos = match.end()
        self.depth -= 1
        self._prompts[start] = (nodes, pos)
        return nodes, pos

    def bracket(self, pos: int) -> _Item | None:
        """The bracketed construct opening at `pos`, or None when it does not close properly."""
        if pos not in self._brackets:
            self._brackets[pos] = self._round(pos) if self.text[pos] == "(" else self._square(pos)
        return self._brackets[pos]

    def _round(self, pos: int) -> _Item | None:
        """`(prompt)` or `(prompt:prompt)`, kept as text."""
        inner, end = self.prompt(pos + 1)
        if self._at(end, ")"):
            return ["(", *inner, ")"], end + 1
        if self._at(end, ":"):
            second, close = self.prompt(end + 1)
            if self._at(close, ")"):
                return ["(", *inner, ":", *second, ")"], close + 1
        return None

    def _square(self, pos: int) -> _Item | None:
        """`[prompt]` (kept as text), an alternation or a schedule."""
        first, end = self.prompt(pos + 1)
        if self._at(end, "]"):
            return ["[", *first, "]"], end + 1
        if self._at(end, "|"):
            return self._alternate(first, end)
        if self._at(end, ":"):
            return self._scheduled(first, end)
        return None

    def _alternate(self, first: list[_Node], end: int) -> _Item | None:
        """The rest of `[a|b|...]` after its first option."""
        options = [tuple(first)]
        while self._at(end, "|"):
            option, end = self.prompt(end + 1)
            options.append(tuple(option))
        return ([_Alternate(tuple(options))], end + 1) if self._at(end, "]") else None

    def _scheduled(self, first: list[_Node], colon: int) -> _Item | None:
        """The rest of `[a:when]` or `[a:b:when]` after its first colon."""
        when = _RE_WHEN.match(self.text, colon + 1)
        if when:
            return [_scheduled(None, first, when.group(1))], when.end()
        second, end = self.prompt(colon + 1)
        when = _RE_WHEN.match(self.text, end + 1) if self._at(end, ":") else None
        if when:
            return [_scheduled(first, second, when.group(1))], when.end()
        return None


def _scheduled(before: list[_Node] | None, after: list[_Node], number: str) -> _Scheduled:
    """A `_Scheduled` node from the parsed parts and the number as written."""
    return _Scheduled(None if before is None else tuple(before), tuple(after), float(number), "." in number)


@dataclass(frozen=True)
class _Timeline:
    """How `when` numbers map to steps of one pass (A1111 `get_learned_conditioning_prompt_schedules`)."""

    steps: int
    legacy: bool = False
    int_offset: int = 0
    """Subtracted from step numbers: the first pass's step count in A1111's hires form, else 0."""
    fraction_offset: float = 0.0
    """Subtracted from fractions: 1.0 in A1111's hires form (1..2 address the hires pass), else 0."""

    def switch_step(self, node: _Scheduled) -> int:
        """The last 1-based step that uses `before`: A1111's `min(steps, int(v))` (never below -1 here)."""
        if self.legacy:
            value = node.when * self.steps if node.when < 1 else node.when
        elif node.dotted:
            value = (node.when - self.fraction_offset) * self.steps
        else:
            value = node.when - self.int_offset
        return int(max(-1.0, min(float(self.steps), value)))


def _render(nodes: tuple[_Node, ...] | list[_Node], step: int, timeline: _Timeline, out: list[str]) -> None:
    """Append the text of `nodes` at 1-based `step` to `out`."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= timeline.switch_step(node) else node.after
            _render(chosen, step, timeline, out)
        else:
            _render(node.options[(step - 1) % len(node.options)], step, timeline, out)


def _timeline(steps: int, timeline: str, first_pass_steps: int | None) -> _Timeline:
    """The step mapping of one pass; `first_pass_steps` set means this is the hires pass of a two-stage run."""
    if timeline not in TIMELINES:
        raise ValueError(f"`timeline` must be one of {', '.join(TIMELINES)}, got {timeline!r}")
    if timeline == "legacy":
        return _Timeline(steps, legacy=True)
    if first_pass_steps is None:
        return _Timeline(steps)
    return _Timeline(steps, int_offset=int(first_pass_steps), fraction_offset=1.0)


def prompts_per_step(text: str, steps: int, *, timeline: Timeline = "a1111",
                     first_pass_steps: int | None = None) -> list[str]:
    """The prompt at each of `steps` steps with `[a:b:when]`, `[a:when]`, `[a::when]` and `[a|b]` resolved.

    Convention (A1111's schedule numbering): entry i is step i + 1; `before` is used while step <= the switch
    step, truncated to an int and capped at `steps`. `timeline` picks how `when` is read (A1111's setting
    "Use old prompt editing timelines", `use_old_scheduling`; its help text: "old: If N < 1, it's a fraction
    of steps (and hires fix uses range from 0 to 1), if N >= 1, it's an absolute number of steps; new: If N
    has a decimal point in it, it's a fraction of steps (and hires fix uses range from 1 to 2), otherwise
    it's an absolute number of steps"):

    - "a1111" (A1111's default since 1.6): a number written with "." is a fraction of the steps, otherwise
      a step number. So `[a:b:0.5]` over 10 steps gives "a" for steps 1..5; `[a:b:1.5]` is "a" throughout a
      single pass, and `[a:b:3]` switches after step 3. For the hires pass of a two-stage run pass
      `first_pass_steps` (the first pass's step count): fractions then count from 1 (1..2 span the hires
      pass) and step numbers from the end of the first pass, as A1111 does for its hires conds. So over 10
      hires steps `a [b:1.5] c` is "a  c" for hires steps 1..5, then "a b c" (the first pass sees "a  c"
      throughout), `[a:b:0.5]` and `[a:b:5]` (after 20 first-pass steps) are "b" for the whole hires pass, and
      `[a:b:25]` switches after hires step 5.
    - "legacy" (`use_old_scheduling`, this project's rule before): `when` < 1 is a fraction of `steps`,
      otherwise a step number; `[a:b:1.5]` switches after step 1. The hires pass uses the same rule over its
      own steps (`first_pass_steps` is ignored). Deviation: A1111 resolves it over the first pass's step
      count (the same thing when the hires pass has as many steps, its default).

    A1111's sampler looks the schedule up with a 0-based counter, giving the first prompt one extra step; we
    do not copy that. Alternation starts with the first option. Weighting syntax is left in place for
    `parse_weighted`. Text that does not fit the grammar (a `|` outside `[...]`, a lone trailing backslash)
    is returned unchanged for every step, as A1111 does; so is bracket nesting deeper than 100. Never raises
    on any text (an unknown `timeline` is a ValueError). Deviation: where runs of stray brackets make A1111's
    (lark Earley) grammar ambiguous, as in `[a:3]::`, A1111 sometimes reads the whole prompt literally; we
    keep the schedule.
    """
    mapping = _timeline(steps, timeline, first_pass_steps)
    if steps < 1:
        return []
    try:
        nodes = _ScheduleParser(text).parse()
    except _NoParse as exc:
        log.debug("prompt schedule syntax not parsed (%s); using the prompt literally", exc)
        return [text] * steps
    if all(isinstance(node, str) for node in nodes):
        return [text] * steps
    out: list[str] = []
    for step in range(1, steps + 1):
        parts: list[str] = []
        _render(nodes, step, mapping, parts)
        out.append("".join(parts))
    return out


def prompt_schedule(text: str, steps: int, *, timeline: Timeline = "a1111",
                    first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111-style schedule: (last 1-based step, prompt) for each run of steps sharing one prompt."""
    out: list[tuple[int, str]] = []
    per_step = prompts_per_step(text, steps, timeline=timeline, first_pass_steps=first_pass_steps)
    for step, prompt in enumerate(per_step, start=1):
        if out and out[-1][1] == prompt:
            out[-1] = (step, prompt)
        else:
            out.append((step, prompt))
    return out

