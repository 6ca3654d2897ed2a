"""Textual-inversion embeddings (issue 18): files built here with random or known vectors, on the tiny models.

The tiny tokenizer is character-level (a word of k letters is k tokens, the last with "</w>"), so a name is many
tokens and an embedding of n vectors visibly takes n positions. A file whose vectors are the token-embedding rows
of a real word must encode exactly like that word: the closed form the substitution is checked against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import ValidationError
from pipelines.prompts.embeddings import EmbeddingLibrary, describe
from pipelines.prompts.encoding import PLACEHOLDER, PromptEncoder, count_tokens_with, tokenize_chunks


def _write(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _with(base: PromptEncoder, folder: Path) -> PromptEncoder:
    """`base`'s tokenizers and encoders with the embeddings in `folder`."""
    return PromptEncoder(base.tokenizers, base.text_encoders, pooled=base.pooled,
                         embeddings=EmbeddingLibrary(folder).snapshot())


def _rows(enc: PromptEncoder, index: int, word: str) -> torch.Tensor:
    """The token-embedding rows of `word`'s tokens in text encoder `index` (a file "spelling" that word)."""
    ids = enc.tokenizers[index](word, add_special_tokens=False)["input_ids"]
    return enc.text_encoders[index].get_input_embeddings().weight[ids].detach().clone()


def _captured_inputs(enc: PromptEncoder, text: str, **kw) -> list[torch.Tensor]:
    """What each text encoder's embedding block (token + position embeddings) outputs while `enc` encodes `text`."""
    seen: list[torch.Tensor] = []
    hooks = [getattr(te, "text_model", te).embeddings.register_forward_hook(lambda m, a, out: seen.append(out))
             for te in enc.text_encoders]
    try:
        enc.encode(text, **kw)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


# ---------------------------------------------------------------- SD 1.x


def test_sd1_vectors_replace_exactly_the_embedding_positions(sd: PromptEncoder, tmp_path: Path) -> None:
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    _write(tmp_path, "myemb", {"emb_params": vector})
    enc = _with(sd, tmp_path)
    chunk = tokenize_chunks(sd.tokenizers[0], "a myemb b", embeddings=enc.embeddings.counts)[0]
    plain = tokenize_chunks(sd.tokenizers[0], "a x b")[0]
    assert chunk.fixes == ((2, "myemb"),) and chunk.tokens[2] == PLACEHOLDER
    assert chunk.tokens[:2] + chunk.tokens[3:] == plain.tokens[:2] + plain.tokens[3:]
    # the text encoder's input (token + position embeddings): the vector at position 2, "a x b"'s elsewhere
    with_emb, = _captured_inputs(enc, "a myemb b")
    reference, = _captured_inputs(enc, "a x b")
    positions = sd.text_encoders[0].text_model.embeddings.position_embedding.weight if hasattr(
        sd.text_encoders[0], "text_model") else sd.text_encoders[0].embeddings.position_embedding.weight
    assert torch.allclose(with_emb[0, 2], vector[0] + positions[2], atol=1e-6)
    others = [i for i in range(77) if i != 2]
    assert torch.equal(with_emb[0, others], reference[0, others])
    assert not torch.equal(enc.encode("a myemb b").embeds, enc.encode("a x b").embeds)


def test_sd1_embedding_of_a_words_rows_encodes_like_the_word(sd: PromptEncoder, tmp_path: Path) -> None:
    """Closed form: vectors = the token embeddings of "x" (1 vector) and "xy" (2 vectors)."""
    _write(tmp_path, "onevec", {"<onevec>": _rows(sd, 0, "x")[0]})  # diffusers' form: one [d] vector
    _write(tmp_path, "twovec", {"string_to_param.*": _rows(sd, 0, "xy")})  # A1111's older form, 2 vectors
    enc = _with(sd, tmp_path)
    assert torch.equal(enc.encode("a onevec, b").embeds, sd.encode("a x, b").embeds)
    assert torch.equal(enc.encode("a twovec b").embeds, sd.encode("a xy b").embeds)
    # two vectors: every later token sits one position further than after a one-token word
    two = tokenize_chunks(sd.tokenizers[0], "a twovec b", embeddings=enc.embeddings.counts)[0].tokens
    one = tokenize_chunks(sd.tokenizers[0], "a x b")[0].tokens
    assert two[:2] == one[:2] and two[2:4] == (PLACEHOLDER, PLACEHOLDER) and two[4:6] == one[3:5]


def test_counter_counts_vectors(sd: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "twovec", {"emb_params": torch.randn(2, 32)})
    counts = EmbeddingLibrary(tmp_path).counts()
    assert counts == {"twovec": 2}
    assert str(count_tokens_with(sd.tokenizers[0], "a twovec b", embeddings=counts)) == "4/75 tokens, 1 chunk"
    assert str(count_tokens_with(sd.tokenizers[0], "a twovec b")) == "8/75 tokens, 1 chunk"  # 6 letters
    # 37 embeddings fill 74 places; the 38th starts the next chunk, which A1111 counts as 75 + 6
    assert str(_with(sd, tmp_path).count_tokens("twovec " * 40)) == "81/150 tokens, 2 chunks"


def test_weighted_embedding(sd: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "twovec", {"emb_params": torch.randn(2, 32)})
    enc = _with(sd, tmp_path)
    chunk = tokenize_chunks(sd.tokenizers[0], "a (twovec:1.2) b", embeddings=enc.embeddings.counts)[0]
    assert chunk.weights[:5] == (1.0, 1.0, 1.2, 1.2, 1.0) and chunk.fixes == ((2, "twovec"),)
    plain = enc.encode("a twovec b", emphasis="none").embeds
    weighted = enc.encode("a (twovec:1.2) b", emphasis="none").embeds
    assert torch.allclose(weighted[0, 2:4], plain[0, 2:4] * 1.2)
    assert torch.equal(weighted[0, [0, 1, *range(4, 77)]], plain[0, [0, 1, *range(4, 77)]])


def test_unknown_names_and_longer_words_stay_text(sd: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "myemb", {"emb_params": torch.randn(1, 32)})
    enc = _with(sd, tmp_path)
    for text in ("a otheremb b", "a myembx b", "a my emb b", "myem"):
        assert tokenize_chunks(sd.tokenizers[0], text, embeddings=enc.embeddings.counts) == \
            tokenize_chunks(sd.tokenizers[0], text)
        assert torch.equal(enc.encode(text).embeds, sd.encode(text).embeds)
    assert enc.embeddings_used("a myemb, [myemb] otheremb") == ["myemb"]


def test_embedding_is_never_split_over_two_chunks(sd: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "twovec", {"emb_params": torch.randn(2, 32)})
    counts = EmbeddingLibrary(tmp_path).counts()
    text = "x" * 74 + " twovec b"  # 74 tokens: the 2 vectors do not fit the first chunk's last place
    first, second = tokenize_chunks(sd.tokenizers[0], text, embeddings=counts)
    assert first.fixes == () and first.tokens[75] == sd.tokenizers[0].eos_token_id
    assert second.fixes == ((1, "twovec"),) and second.tokens[1:3] == (PLACEHOLDER, PLACEHOLDER)
    assert str(count_tokens_with(sd.tokenizers[0], text, embeddings=counts)) == "78/150 tokens, 2 chunks"
    # a comma shortly before a full chunk moves the words after it, the embedding's fix with them
    text = "x" * 60 + ", yyyyyyyyyyyy twovec z"
    first, second = tokenize_chunks(sd.tokenizers[0], text, embeddings=counts)
    assert first.fixes == () and second.fixes == ((13, "twovec"),)


def test_wrong_width_and_bad_files_are_clear_errors(sd: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "wide", {"emb_params": torch.randn(1, 64)})
    _write(tmp_path, "xlonly", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)})
    _write(tmp_path, "two", {"a": torch.randn(1, 32), "b": torch.randn(1, 32)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    enc = _with(sd, tmp_path)
    with pytest.raises(ValidationError, match=r"`embedding` holds 64-wide vectors.*needs 32.*got '.*/wide\.safetensors'"):
        enc.encode("a wide b")
    with pytest.raises(ValidationError, match=r"SDXL embedding.*needs 32-wide.*xlonly\.safetensors"):
        enc.encode("xlonly")
    with pytest.raises(ValidationError, match=r"holds 2 tensors.*two\.safetensors"):
        enc.encode("two")
    with pytest.raises(ValidationError, match=r"header.*junk\.safetensors"):
        enc.encode("junk")
    assert torch.equal(enc.encode("a b").embeds, sd.encode("a b").embeds)  # unused bad files do no harm


# ---------------------------------------------------------------- SDXL: clip_l for text_encoder, clip_g for _2


def test_sdxl_pair_replaces_both_encoders_inputs(sdxl: PromptEncoder, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    clip_l, clip_g = torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)
    _write(tmp_path, "xlemb", {"clip_l": clip_l, "clip_g": clip_g})
    enc = _with(sdxl, tmp_path)
    with_emb = _captured_inputs(enc, "a xlemb b")
    reference = _captured_inputs(enc, "a x b")
    others = [i for i in range(77) if i != 2]
    for index, vector in enumerate((clip_l, clip_g)):
        te = sdxl.text_encoders[index]
        positions = getattr(te, "text_model", te).embeddings.position_embedding.weight
        assert torch.allclose(with_emb[index][0, 2], vector[0] + positions[2], atol=1e-6)
        assert torch.equal(with_emb[index][0, others], reference[index][0, others])


def test_sdxl_pair_of_a_words_rows_encodes_like_the_word(sdxl: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "xlemb", {"clip_l": _rows(sdxl, 0, "xy"), "clip_g": _rows(sdxl, 1, "xy")})
    enc = _with(sdxl, tmp_path)
    got, want = enc.encode("a (xlemb:1.1) b"), sdxl.encode("a (xy:1.1) b")
    assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)


def test_sdxl_needs_both_clip_l_and_clip_g(sdxl: PromptEncoder, tmp_path: Path) -> None:
    _write(tmp_path, "lonly", {"clip_l": torch.randn(1, 32)})
    _write(tmp_path, "sd1emb", {"emb_params": torch.randn(1, 32)})
    enc = _with(sdxl, tmp_path)
    with pytest.raises(ValidationError, match=r"SDXL needs both clip_l and clip_g.*lonly\.safetensors"):
        enc.encode("lonly")
    with pytest.raises(ValidationError, match=r"SDXL needs both clip_l \(32\) and clip_g.*sd1emb\.safetensors"):
        enc.encode("sd1emb")


# ---------------------------------------------------------------- files, cache, engine and metadata


@pytest.mark.parametrize(("tensors", "keys", "vectors", "problem"), [
    ({"emb_params": torch.zeros(3, 8)}, ("emb_params",), 3, None),  # A1111
    ({"string_to_param.*": torch.zeros(2, 8)}, ("string_to_param.*",), 2, None),  # A1111's older form
    ({"<cat-toy>": torch.zeros(8)}, ("<cat-toy>",), 1, None),  # diffusers learned_embeds
    ({"clip_g": torch.zeros(2, 12), "clip_l": torch.zeros(2, 8)}, ("clip_l", "clip_g"), 2, None),  # SDXL
    ({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 12)}, (), 1, "2 clip_l vectors but 3 clip_g"),
    ({"emb_params": torch.zeros(76, 8)}, (), 1, "76 vectors"),
    ({"emb_params": torch.zeros(2, 2, 8)}, (), 1, "not \\[vectors, width\\]"),
])
def test_describe_formats(tmp_path: Path, tensors, keys, vectors, problem) -> None:
    emb = describe(_write(tmp_path, "e", tensors))
    assert (emb.name, emb.keys, emb.vectors) == ("e", keys, vectors)
    if problem is None:
        assert emb.problem is None
    else:
        assert emb.problem is not None and __import__("re").search(problem, emb.problem)


def test_replacing_a_file_re_encodes(manager, tmp_path: Path) -> None:
    from pipelines.denoise.stages import PromptCache, StageSpec, build_conditioning

    model = manager.get("tiny")
    library, cache = EmbeddingLibrary(tmp_path), PromptCache()
    path = _write(tmp_path, "myemb", {"emb_params": torch.randn(1, 32)})

    def cond() -> torch.Tensor:
        spec = StageSpec(prompt="a myemb b", negative_prompt="", width=64, height=64, steps=2, sampler="Euler",
                         cfg="7", seeds=[1], embeddings=library.snapshot())
        return build_conditioning(model, spec, cache, 2)(0).cond

    first = cond()
    assert torch.equal(cond(), first) and cache.hits == 2  # prompt and negative from the cache
    _write(tmp_path, "myemb", {"emb_params": torch.randn(1, 32)})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not torch.equal(cond(), first)


def test_engine_counter_metadata_and_errors(tiny_cache, tmp_path: Path, req_factory) -> None:
    from pipelines.a1111 import parse_infotext
    from pipelines.engine import Engine
    from pipelines.metadata import request_from_infotext
    from pipelines.models.manager import ModelManager

    folder = tmp_path / "models" / "embeddings"
    path = _write(folder, "twovec", {"emb_params": torch.randn(2, 32)})
    _write(folder, "wide", {"emb_params": torch.randn(1, 64)})
    engine = Engine(ModelManager(tmp_path / "models", device="cpu", dtype="fp32"), None)
    assert engine.count_tokens("tiny", "a twovec b") == "4/75 tokens, 1 chunk"
    result = engine.generate(req_factory(prompt="a (twovec:1.2) b", negative_prompt="twovec", steps=2), save=False)
    params = parse_infotext(result.infotexts[0])
    assert params["TI hashes"] == f"twovec: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert '"twovec: ' in result.infotexts[0]  # quoted like A1111
    assert request_from_infotext(result.infotexts[0]).prompt == "a (twovec:1.2) b"
    plain = engine.generate(req_factory(prompt="a b", steps=2), save=False)
    assert "TI hashes" not in parse_infotext(plain.infotexts[0])
    with pytest.raises(ValidationError, match=r"64-wide.*needs 32.*embeddings/wide\.safetensors"):
        engine.generate(req_factory(prompt="[x:wide:1]", steps=2), save=False)
