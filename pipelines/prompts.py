"""A1111 prompt syntax: attention weights, BREAK, scheduling and alternation, weighted chunked CLIP encoding.

The parsing half is pure Python (torch is imported lazily inside the encoder), so the UI can count tokens
without torch. Semantics follow AUTOMATIC1111's `modules/prompt_parser.py` (`parse_prompt_attention`,
`get_learned_conditioning_prompt_schedules`) and `modules/sd_hijack_clip.py` (75-token chunks, BREAK,
comma backtracking, "Original" emphasis). Deviations, all on inputs where A1111 crashes or misbehaves,
are listed in the docstring of the function concerned.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
MAX_WEIGHT = 1e6  # weights are clamped to [MIN_WEIGHT, MAX_WEIGHT] in magnitude (zero stays zero)
MIN_WEIGHT = 1e-6
CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make 77
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: move words after a comma this close to a chunk's end
Emphasis = Literal["a1111", "none"]

_RE_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_RE_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_RE_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_MAX_DEPTH = 100  # deeper bracket nesting makes the schedule parser give up: the prompt is used literally


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
            return [_Scheduled(None, tuple(first), float(when.group(1)))], when.end()
        second, end = self.prompt(colon + 1)
        when = _RE_WHEN.match(self.text, end + 1) if self._at(end, ":") else None
        if when:
            return [_Scheduled(tuple(first), tuple(second), float(when.group(1)))], when.end()
        return None


def _when_step(when: float, steps: int) -> int:
    """A1111 (classic scheduling): `when` < 1 is a fraction of `steps`, else a step number; capped at steps."""
    value = when * steps if when < 1 else when
    return int(max(-1.0, min(float(steps), value)))


def _render(nodes: tuple[_Node, ...] | list[_Node], step: int, steps: int, out: list[str]) -> None:
    """Append the text of `nodes` at 1-based `step` to `out`."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= _when_step(node.when, steps) else node.after
            _render(chosen, step, steps, out)
        else:
            _render(node.options[(step - 1) % len(node.options)], step, steps, out)


def prompts_per_step(text: str, steps: int) -> list[str]:
    """The prompt at each of `steps` steps with `[a:b:when]`, `[a:when]`, `[a::when]` and `[a|b]` resolved.

    Convention (A1111's schedule numbering): entry i is step i + 1; `when` < 1 is a fraction of `steps`,
    otherwise a step number, truncated to an int; `before` is used while step <= when. So `[a:b:0.5]` over
    10 steps gives "a" for entries 0..4 (steps 1..5) and "b" for entries 5..9. A1111's sampler looks the
    schedule up with a 0-based counter, giving the first prompt one extra step; we do not copy that.
    Alternation starts with the first option. Weighting syntax is left in place for `parse_weighted`.
    Text that does not fit the grammar (a `|` outside `[...]`, a lone trailing backslash) is returned
    unchanged for every step, as A1111 does; so is bracket nesting deeper than 100. Never raises.
    Deviation: where runs of stray brackets make A1111's (lark Earley) grammar ambiguous, as in
    `[a:3]::`, A1111 sometimes reads the whole prompt literally; we keep the schedule.
    """
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
        _render(nodes, step, steps, parts)
        out.append("".join(parts))
    return out


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111-style schedule: (last 1-based step, prompt) for each run of steps sharing one prompt."""
    out: list[tuple[int, str]] = []
    for step, prompt in enumerate(prompts_per_step(text, steps), start=1):
        if out and out[-1][1] == prompt:
            out[-1] = (step, prompt)
        else:
            out.append((step, prompt))
    return out


# ---------------------------------------------------------------- tokens and 75-token chunks


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window fed to a text encoder."""

    tokens: tuple[int, ...]
    """BOS, up to 75 prompt tokens, EOS, then padding to 77."""
    weights: tuple[float, ...]
    """The weight of each token; 1.0 for BOS, EOS and padding."""


@dataclass(frozen=True)
class TokenCount:
    """Prompt length as A1111's token counter shows it."""

    tokens: int
    """Tokens used: 75 per finished chunk (BREAK or comma padding included) plus the last chunk's."""
    limit: int
    """75 x chunks."""
    chunks: int
    """Number of 77-token chunks the prompt is encoded in."""

    def __str__(self) -> str:
        """E.g. "83/150 tokens, 2 chunks"."""
        return f"{self.tokens}/{self.limit} tokens, {self.chunks} chunk{'' if self.chunks == 1 else 's'}"


class _Chunker:
    """A1111's `tokenize_line` loop: fills 75-token chunks, moving words after a nearby comma on."""

    def __init__(self, comma: int | None):
        self.comma, self.chunks = comma, []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.last_comma, self.count = -1, 0

    def close(self, last: bool = False) -> None:
        """Finish the current chunk (BREAK, full, or end of text)."""
        self.count += len(self.tokens) if last else CHUNK_TOKENS
        self.chunks.append((self.tokens, self.weights))
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        """Append one token, starting a new chunk first when the current one is full."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK_TOKENS and self.last_comma != -1 and (
            len(self.tokens) - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.close()
            self.tokens, self.weights = moved
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()
        self.tokens.append(token)
        self.weights.append(weight)

    def finish(self) -> _Chunker:
        """Close the last chunk (an empty prompt still gets one)."""
        if self.tokens or not self.chunks:
            self.close(last=True)
        return self


def _comma_id(tokenizer: Any) -> int | None:
    """The id of the CLIP token ",</w>", or None when the vocabulary lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _chunk(tokenizer: Any, text: str) -> _Chunker:
    """Tokenize the weighted fragments of `text` (no special tokens) into A1111 chunks."""
    parsed = parse_weighted(text)
    words = [frag for frag, weight in parsed if not (frag == BREAK and weight == -1.0)]
    ids = iter(tokenizer(words, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    chunker = _Chunker(_comma_id(tokenizer))
    for frag, weight in parsed:
        if frag == BREAK and weight == -1.0:
            chunker.close()
            continue
        for token in next(ids):
            chunker.add(token, weight)
    return chunker.finish()


def _pad_id(tokenizer: Any) -> int:
    """Padding after EOS: the tokenizer's pad token (EOS for CLIP-L as in A1111, "!" for OpenCLIP)."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _window(tokenizer: Any, tokens: list[int], weights: list[float]) -> PromptChunk:
    """Wrap up to 75 tokens in BOS ... EOS and pad to 77."""
    pad = CHUNK_TOKENS - len(tokens)
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [_pad_id(tokenizer)] * pad
    return PromptChunk(tuple(ids), (1.0, *weights, 1.0) + (1.0,) * pad)


def tokenize_chunks(tokenizer: Any, text: str, *, min_chunks: int = 1) -> list[PromptChunk]:
    """The 77-token chunks of one (schedule-resolved) prompt, padded with empty chunks to `min_chunks`."""
    chunks = [_window(tokenizer, toks, weights) for toks, weights in _chunk(tokenizer, text).chunks]
    return chunks + [_window(tokenizer, [], [])] * (min_chunks - len(chunks))


def count_tokens_with(tokenizer: Any, text: str, *, steps: int = 20) -> TokenCount:
    """Token count of `text` with a tokenizer only; with schedules, the longest prompt over `steps`."""
    texts = sorted({prompt for _, prompt in prompt_schedule(text, steps)} or {text})
    chunkers = [_chunk(tokenizer, prompt) for prompt in texts]
    best = max(chunkers, key=lambda c: (c.count, len(c.chunks)))
    return TokenCount(best.count, CHUNK_TOKENS * len(best.chunks), len(best.chunks))


# ---------------------------------------------------------------- weighted, chunked encoding


@dataclass(frozen=True)
class EncodedPrompt:
    """Text-encoder output for one prompt; shared via the cache, so never modify the tensors in place."""

    embeds: torch.Tensor
    """[1, 77 * chunks, D] token embeddings, chunk after chunk."""
    pooled: torch.Tensor | None
    """[1, P] pooled embedding of the first chunk (SDXL's text_encoder_2 `text_embeds`), else None."""

    @property
    def chunks(self) -> int:
        """Number of 77-token chunks."""
        return self.embeds.shape[1] // (CHUNK_TOKENS + 2)


def _final_norm(encoder: Any) -> Any:
    """A CLIP text model's final layer norm (`text_model.final_layer_norm` before transformers 5)."""
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _emphasize(z: torch.Tensor, weights: tuple[float, ...], emphasis: Emphasis) -> torch.Tensor:
    """Scale each token's embedding by its weight; "a1111" then restores the chunk's mean (A1111 Original)."""
    if all(weight == 1.0 for weight in weights):
        return z
    import torch

    weighted = z * torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
    if emphasis == "a1111":
        factor = z.float().mean() / weighted.float().mean()
        # A1111 divides by the weighted mean; when that is ~0 (extreme or cancelling weights) the factor explodes
        # and the image turns to NaN there. Skip the mean restore in that case: the weights still apply.
        if torch.isfinite(factor) and abs(float(factor)) < 1e3:
            weighted = weighted * factor.to(z.dtype)
    return weighted


class PromptEncoder:
    """A1111-style prompt encoding: weights, BREAK and any length in 77-token chunks, for SD 1.x/2.x and SDXL.

    SD 1.x/2.x: the last hidden state, or with `clip_skip` = k > 1 hidden_states[-k] through the final
    layer norm (A1111). SDXL: hidden_states[-(clip_skip + 1)] of both encoders without final norm,
    concatenated on features; pooled from text_encoder_2. Nothing is cached here: the engine's PromptCache
    (keyed by model, LoRAs, text and options) is the one cache of encodings.
    """

    def __init__(self, tokenizers: list, text_encoders: list, *, sdxl: bool, clip_skip: int = 1):
        expected = 2 if sdxl else 1
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(
                f"`tokenizers` and `text_encoders` must each hold {expected} item(s) for "
                f"{'SDXL' if sdxl else 'SD 1.x/2.x'}, got {len(tokenizers)} and {len(text_encoders)}"
            )
        layers = min(te.config.num_hidden_layers for te in text_encoders)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"`clip_skip` must be between 1 and {layers}, got {clip_skip}")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.sdxl, self.clip_skip = sdxl, clip_skip

    @classmethod
    def from_pipe(cls, pipe: Any, *, clip_skip: int = 1) -> PromptEncoder:
        """An encoder over a diffusers pipeline's tokenizer(s) and text encoder(s)."""
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
        encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
        return cls(tokenizers, encoders, sdxl=sdxl, clip_skip=clip_skip)

    def chunk_count(self, text: str) -> int:
        """How many 77-token chunks `text` (one step's prompt) needs."""
        return max(len(_chunk(tokenizer, text).chunks) for tokenizer in self.tokenizers)

    def count_tokens(self, text: str, *, steps: int = 20) -> TokenCount:
        """A1111's token counter for `text` (the longest scheduled prompt over `steps`)."""
        return count_tokens_with(self.tokenizers[0], text, steps=steps)

    def encode(self, text: str, *, emphasis: Emphasis = "a1111", min_chunks: int = 1) -> EncodedPrompt:
        """Encode one step's prompt (scheduling already resolved), padded with empty chunks to `min_chunks`."""
        if emphasis not in ("a1111", "none"):
            raise ValueError(f"`emphasis` must be 'a1111' or 'none', got {emphasis!r}")
        return self._encode(text, emphasis, max(1, min_chunks))

    def encode_per_step(self, text: str, steps: int, *, emphasis: Emphasis = "a1111",
                        min_chunks: int = 1) -> list[EncodedPrompt]:
        """One encoding per step (see `prompts_per_step`), all padded to the same chunk count."""
        texts = prompts_per_step(text, steps)
        chunks = max([min_chunks, *(self.chunk_count(prompt) for prompt in set(texts))])
        encoded = {prompt: self.encode(prompt, emphasis=emphasis, min_chunks=chunks) for prompt in set(texts)}
        return [encoded[prompt] for prompt in texts]  # each distinct text encoded once

    def _encode(self, text: str, emphasis: Emphasis, min_chunks: int) -> EncodedPrompt:
        """Tokenize per tokenizer, encode chunk by chunk, weight, concatenate."""
        import torch

        per_tokenizer = [_chunk(tokenizer, text).chunks for tokenizer in self.tokenizers]
        count = max([min_chunks, *(len(chunks) for chunks in per_tokenizer)])
        embeds, pooled = [], None
        with torch.no_grad():
            for index, tokenizer in enumerate(self.tokenizers):
                zs = []
                for number, chunk in enumerate(tokenize_chunks(tokenizer, text, min_chunks=count)):
                    z, pool = self._run(index, chunk.tokens)
                    zs.append(_emphasize(z, chunk.weights, emphasis))
                    pooled = pool if number == 0 and pool is not None else pooled
                embeds.append(torch.cat(zs, dim=1))
        return EncodedPrompt(torch.cat(embeds, dim=-1), pooled)

    def _run(self, index: int, tokens: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One 77-token chunk through text encoder `index`: (hidden states [1, 77, D], pooled or None)."""
        import torch

        encoder = self.text_encoders[index]
        ids = torch.tensor([tokens], dtype=torch.long, device=encoder.device)
        out = encoder(ids, output_hidden_states=self.sdxl or self.clip_skip > 1)
        if self.sdxl:
            z = out.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip > 1:
            z = _final_norm(encoder)(out.hidden_states[-self.clip_skip])
        else:
            z = out.last_hidden_state
        return z, (out.text_embeds if self.sdxl and index == 1 else None)
