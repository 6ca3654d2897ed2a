"""Prompts -> tokens -> embeddings: A1111's 75-token chunks (BREAK, comma backtracking), token counts, and the
weighted chunked CLIP encoding for SD 1.x/2.x and SDXL (`modules/sd_hijack_clip.py`: "Original" emphasis).

Tokenizing and counting are pure Python; torch is imported lazily inside the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipelines.prompts import BREAK, parse_weighted, prompt_schedule, prompts_per_step

if TYPE_CHECKING:
    import torch

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make 77
COMMA_BACKTRACK = 20  # A1111 `comma_padding_backtrack`: move words after a comma this close to a chunk's end
Emphasis = Literal["a1111", "none"]

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
