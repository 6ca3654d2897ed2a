"""Prompts -> tokens -> embeddings: A1111's 75-token chunks (BREAK, comma backtracking), token counts, and the
weighted chunked CLIP encoding for SD 1.x/2.x and SDXL (`modules/sd_hijack_clip.py`: "Original" emphasis), with
textual-inversion embeddings (`pipelines.prompts.embeddings`) matched in the token stream and substituted for token
embeddings (A1111 `sd_hijack_clip.tokenize_line`, `sd_hijack.EmbeddingsWithFixes`).

Tokenizing and counting are pure Python; torch is imported lazily inside the encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipelines.prompts.parser import BREAK, parse_weighted, prompt_schedule, prompts_per_step

if TYPE_CHECKING:
    import torch

    from pipelines.prompts.embeddings import Embeddings

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make 77
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: move words after a comma this close to a chunk's end
PLACEHOLDER = 0  # token id under an embedding's vectors (A1111's too); the text encoder never sees its embedding
Emphasis = Literal["a1111", "none"]

# ---------------------------------------------------------------- tokens and 75-token chunks


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window fed to a text encoder."""

    tokens: tuple[int, ...]
    """BOS, up to 75 prompt tokens, EOS, then padding to 77."""
    weights: tuple[float, ...]
    """The weight of each token; 1.0 for BOS, EOS and padding."""
    fixes: tuple[tuple[int, str], ...] = ()
    """(position in the 77 tokens, embedding name) of each embedding: its vectors replace the token embeddings
    of its placeholder tokens there."""


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
    """A1111's `tokenize_line` loop: fills 75-token chunks, moving words after a nearby comma on, never splitting
    an embedding's vectors over two chunks."""

    def __init__(self, comma: int | None):
        self.comma = comma
        self.chunks: list[tuple[list[int], list[float], list[tuple[int, str]]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []
        self.last_comma, self.count = -1, 0

    def close(self, last: bool = False) -> None:
        """Finish the current chunk (BREAK, full, or end of text)."""
        self.count += len(self.tokens) if last else CHUNK_TOKENS
        self.chunks.append((self.tokens, self.weights, self.fixes))
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def _make_room(self, token: int) -> None:
        """A1111's checks before each token: note a comma; at a full chunk move the words after a near comma on
        (embeddings among them too: a deviation, A1111 leaves their fixes behind), else start a new chunk."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK_TOKENS and self.last_comma != -1 and (
            len(self.tokens) - self.last_comma <= COMMA_BACKTRACK
        ):
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:], [(at - cut, n) for at, n in self.fixes if at >= cut]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.fixes = [(at, n) for at, n in self.fixes if at < cut]
            self.close()
            self.tokens, self.weights, self.fixes = moved
        if len(self.tokens) == CHUNK_TOKENS:
            self.close()

    def add(self, token: int, weight: float) -> None:
        """Append one token, starting a new chunk first when the current one is full."""
        self._make_room(token)
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, name: str, first_token: int, vectors: int, weight: float) -> None:
        """Append an embedding's `vectors` placeholders, in a new chunk when they do not fit this one."""
        self._make_room(first_token)
        if len(self.tokens) + vectors > CHUNK_TOKENS:
            self.close()
        self.fixes.append((len(self.tokens), name))
        self.tokens.extend([PLACEHOLDER] * vectors)
        self.weights.extend([weight] * vectors)

    def finish(self) -> _Chunker:
        """Close the last chunk (an empty prompt still gets one)."""
        if self.tokens or not self.chunks:
            self.close(last=True)
        return self


def _comma_id(tokenizer: Any) -> int | None:
    """The id of the CLIP token ",</w>", or None when the vocabulary lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


@functools.lru_cache(maxsize=16)
def _name_lookup(tokenizer: Any, names: tuple[str, ...]) -> dict[int, list[tuple[tuple[int, ...], str]]]:
    """A1111's `ids_lookup`: first token id -> (token ids, name) of each embedding name, longest first."""
    out: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    if not names:
        return out
    for name, ids in zip(names, tokenizer(list(names), add_special_tokens=False, verbose=False)["input_ids"],
                         strict=True):
        if ids:
            out.setdefault(ids[0], []).append((tuple(ids), name))
    for matches in out.values():
        matches.sort(key=lambda m: -len(m[0]))
    return out


def _match(lookup: dict, tokens: list[int], at: int) -> tuple[str, int] | None:
    """(name, tokens it spans) of the embedding whose name's tokens start at `at`, longest first; else None."""
    for ids, name in lookup.get(tokens[at], ()):
        if tuple(tokens[at:at + len(ids)]) == ids:
            return name, len(ids)
    return None


def _chunk(tokenizer: Any, text: str, embeddings: Mapping[str, int] | None = None) -> _Chunker:
    """Tokenize the weighted fragments of `text` (no special tokens) into A1111 chunks; `embeddings` maps each
    embedding name to its vector count (a name is matched on its tokens within one weighted fragment)."""
    parsed = parse_weighted(text)
    words = [frag for frag, weight in parsed if not (frag == BREAK and weight == -1.0)]
    ids = iter(tokenizer(words, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
    lookup = _name_lookup(tokenizer, tuple(sorted(embeddings))) if embeddings else {}
    chunker = _Chunker(_comma_id(tokenizer))
    for frag, weight in parsed:
        if frag == BREAK and weight == -1.0:
            chunker.close()
            continue
        tokens, at = next(ids), 0
        while at < len(tokens):
            found = _match(lookup, tokens, at) if lookup else None
            if found is None:
                chunker.add(tokens[at], weight)
                at += 1
            else:
                assert embeddings is not None  # found: in `lookup`, built from `embeddings`
                chunker.add_embedding(found[0], tokens[at], embeddings[found[0]], weight)
                at += found[1]
    return chunker.finish()


def _pad_id(tokenizer: Any) -> int:
    """Padding after EOS: the tokenizer's pad token (EOS for CLIP-L as in A1111, "!" for OpenCLIP)."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def _window(tokenizer: Any, tokens: list[int], weights: list[float], fixes: Sequence[tuple[int, str]] = ()
            ) -> PromptChunk:
    """Wrap up to 75 tokens in BOS ... EOS and pad to 77."""
    pad = CHUNK_TOKENS - len(tokens)
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [_pad_id(tokenizer)] * pad
    return PromptChunk(tuple(ids), (1.0, *weights, 1.0) + (1.0,) * pad, tuple((at + 1, n) for at, n in fixes))


def tokenize_chunks(tokenizer: Any, text: str, *, min_chunks: int = 1,
                    embeddings: Mapping[str, int] | None = None) -> list[PromptChunk]:
    """The 77-token chunks of one (schedule-resolved) prompt, padded with empty chunks to `min_chunks`;
    `embeddings` ({name: vectors}) are laid out as placeholders with their fixes."""
    chunks = [_window(tokenizer, *chunk) for chunk in _chunk(tokenizer, text, embeddings).chunks]
    return chunks + [_window(tokenizer, [], [])] * (min_chunks - len(chunks))


def count_tokens_with(tokenizer: Any, text: str, *, steps: int = 20,
                      embeddings: Mapping[str, int] | None = None) -> TokenCount:
    """Token count of `text` with a tokenizer only; with schedules, the longest prompt over `steps`. An
    embedding ({name: vectors} in `embeddings`) counts its vectors, as in A1111."""
    texts = sorted({prompt for _, prompt in prompt_schedule(text, steps)} or {text})
    chunkers = [_chunk(tokenizer, prompt, embeddings) for prompt in texts]
    best = max(chunkers, key=lambda c: (c.count, len(c.chunks)))
    return TokenCount(best.count, CHUNK_TOKENS * len(best.chunks), len(best.chunks))


def embeddings_in(tokenizer: Any, texts: list[str], embeddings: Mapping[str, int] | None) -> list[str]:
    """The embedding names (keys of `embeddings`) that `texts` (schedule-resolved prompts) use, in first-use order."""
    if not embeddings:
        return []
    names: dict[str, None] = {}
    for text in texts:
        for _, _, fixes in _chunk(tokenizer, text, embeddings).chunks:
            names.update((name, None) for _, name in fixes)
    return list(names)


def ti_hashes(tokenizer: Any, req: Any, embeddings: Embeddings | None) -> dict[str, str]:
    """{"TI hashes": "name: hash, ..."} for the embeddings a `GenerationRequest`'s prompts use (both passes of a
    two-stage run, every scheduled variant), as A1111 writes it into the infotext; {} when none is used."""
    if embeddings is None or not embeddings.files:
        return {}
    texts: dict[str, None] = {}
    for text in (req.prompt, req.negative_prompt):
        texts.update(dict.fromkeys(prompts_per_step(text, req.steps, timeline=req.prompt_timeline)))
    h = req.hires
    if h.enabled:
        for text in (req.prompt if h.prompt is None else h.prompt,
                     req.negative_prompt if h.negative_prompt is None else h.negative_prompt):
            texts.update(dict.fromkeys(prompts_per_step(text, h.steps or req.steps, timeline=req.prompt_timeline,
                                                        first_pass_steps=req.steps)))
    text = embeddings.hashes_text(embeddings_in(tokenizer, list(texts), embeddings.counts))
    return {"TI hashes": text} if text else {}


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
    (keyed by model, LoRAs, text, options and the identity of the embeddings a text uses) is the one cache.

    `embeddings` (`pipelines.prompts.embeddings.Embeddings`): a name in the prompt takes as many token positions as
    its file has vectors, which replace the token embeddings there (a forward hook on the text encoder's token
    embedding layer, held for that call only; neither the tokenizer nor the weights change). Their weight is
    that of the text around them, like any token's.
    """

    def __init__(self, tokenizers: list, text_encoders: list, *, pooled: bool, clip_skip: int = 1,
                 embeddings: Embeddings | None = None):
        expected = 2 if pooled else 1
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(
                f"`tokenizers` and `text_encoders` must each hold {expected} item(s) for "
                f"{'a pooled (SDXL-like)' if pooled else 'an SD 1.x/2.x'} model, got {len(tokenizers)} and {len(text_encoders)}"
            )
        layers = min(te.config.num_hidden_layers for te in text_encoders)
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"`clip_skip` must be between 1 and {layers}, got {clip_skip}")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.pooled, self.clip_skip = pooled, clip_skip
        self.embeddings = embeddings
        self._counts = embeddings.counts if embeddings is not None else None

    @classmethod
    def from_pipe(cls, pipe: Any, *, clip_skip: int = 1) -> PromptEncoder:
        """An encoder over a diffusers pipeline's tokenizer(s) and text encoder(s)."""
        pooled = getattr(pipe, "text_encoder_2", None) is not None
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if pooled else [pipe.tokenizer]
        encoders = [pipe.text_encoder, pipe.text_encoder_2] if pooled else [pipe.text_encoder]
        return cls(tokenizers, encoders, pooled=pooled, clip_skip=clip_skip)

    def chunk_count(self, text: str) -> int:
        """How many 77-token chunks `text` (one step's prompt) needs."""
        return max(len(_chunk(tokenizer, text, self._counts).chunks) for tokenizer in self.tokenizers)

    def count_tokens(self, text: str, *, steps: int = 20) -> TokenCount:
        """A1111's token counter for `text` (the longest scheduled prompt over `steps`)."""
        return count_tokens_with(self.tokenizers[0], text, steps=steps, embeddings=self._counts)

    def embeddings_used(self, text: str) -> list[str]:
        """The embeddings one step's prompt uses, in first-use order."""
        return embeddings_in(self.tokenizers[0], [text], self._counts)

    def embedding_key(self, text: str) -> tuple:
        """The identity of the embedding files `text` uses: part of the prompt cache key, so a replaced file
        re-encodes."""
        if self.embeddings is None:
            return ()
        return self.embeddings.identity(self.embeddings_used(text))

    def encode(self, text: str, *, emphasis: Emphasis = "a1111", min_chunks: int = 1) -> EncodedPrompt:
        """Encode one step's prompt (scheduling already resolved), padded with empty chunks to `min_chunks`."""
        if emphasis not in ("a1111", "none"):
            raise ValueError(f"`emphasis` must be 'a1111' or 'none', got {emphasis!r}")
        return self._encode(text, emphasis, max(1, min_chunks))

    def _encode(self, text: str, emphasis: Emphasis, min_chunks: int) -> EncodedPrompt:
        """Tokenize per tokenizer, encode chunk by chunk, weight, concatenate."""
        import torch

        per_tokenizer = [_chunk(tokenizer, text, self._counts).chunks for tokenizer in self.tokenizers]
        count = max([min_chunks, *(len(chunks) for chunks in per_tokenizer)])
        embeds, pooled = [], None
        with torch.no_grad():
            for index, tokenizer in enumerate(self.tokenizers):
                zs = []
                chunks = tokenize_chunks(tokenizer, text, min_chunks=count, embeddings=self._counts)
                for number, chunk in enumerate(chunks):
                    z, pool = self._run(index, chunk.tokens, chunk.fixes)
                    zs.append(_emphasize(z, chunk.weights, emphasis))
                    pooled = pool if number == 0 and pool is not None else pooled
                embeds.append(torch.cat(zs, dim=1))
        return EncodedPrompt(torch.cat(embeds, dim=-1), pooled)

    def token_embeds(self, index: int, chunk: PromptChunk) -> torch.Tensor:
        """The input token embeddings [1, 77, D] text encoder `index` gets for `chunk`: its token embedding
        layer's output with each embedding's vectors at its fixes (position embeddings are added after)."""
        import torch

        layer = self.text_encoders[index].get_input_embeddings()
        ids = torch.tensor([chunk.tokens], dtype=torch.long, device=layer.weight.device)
        with torch.no_grad():
            return self._substitute(index, chunk.fixes, layer(ids))

    def _substitute(self, index: int, fixes: tuple[tuple[int, str], ...], embeds: torch.Tensor) -> torch.Tensor:
        """`embeds` [1, 77, D] with the vectors of each (position, name) in `fixes` written in (a new tensor)."""
        if not fixes:
            return embeds
        assert self.embeddings is not None  # fixes come only from the names of `self.embeddings`
        widths = [encoder.get_input_embeddings().embedding_dim for encoder in self.text_encoders]
        out = embeds.clone()
        for at, name in fixes:
            vectors = self.embeddings.vectors(name, index, widths)
            out[:, at:at + vectors.shape[0]] = vectors.to(out.device, out.dtype)
        return out

    def _run(self, index: int, tokens: tuple[int, ...], fixes: tuple[tuple[int, str], ...] = ()
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One 77-token chunk through text encoder `index`: (hidden states [1, 77, D], pooled or None)."""
        import torch

        encoder = self.text_encoders[index]
        ids = torch.tensor([tokens], dtype=torch.long, device=encoder.device)
        hook = None
        if fixes:  # A1111's EmbeddingsWithFixes, as a hook held for this call only
            hook = encoder.get_input_embeddings().register_forward_hook(
                lambda _module, _args, output: self._substitute(index, fixes, output))
        try:
            out = encoder(ids, output_hidden_states=self.pooled or self.clip_skip > 1)
        finally:
            if hook is not None:
                hook.remove()
        if self.pooled:
            z = out.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip > 1:
            z = _final_norm(encoder)(out.hidden_states[-self.clip_skip])
        else:
            z = out.last_hidden_state
        return z, (out.text_embeds if self.pooled and index == 1 else None)
