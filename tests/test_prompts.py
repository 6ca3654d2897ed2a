"""A1111 prompt syntax: weights, BREAK, scheduling, and weighted chunked encoding on the tiny models."""

from __future__ import annotations

import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.prompts.encoding import PromptEncoder, TokenCount, count_tokens_with, tokenize_chunks
from pipelines.prompts.parser import BREAK, MAX_WEIGHT, MIN_WEIGHT, parse_weighted, prompt_schedule, prompts_per_step

R, S = 1.1, 1 / 1.1

# ---------------------------------------------------------------- parse_weighted tables

WEIGHT_TABLE = [
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("(a)", [("a", R)]),
    ("((a))", [("a", R * R)]),
    ("[a]", [("a", S)]),
    ("[[a]]", [("a", S * S)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("((a:1.5) b)", [("a", 1.5 * R), (" b", R)]),
    ("[(a) b]", [("a", R * S), (" b", S)]),
    ("(a", [("a", R)]),
    ("x (a", [("x ", 1.0), ("a", R)]),
    ("a)", [("a)", 1.0)]),
    ("[a", [("a", S)]),
    ("a]", [("a]", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("a:1.2)", [("a:1.2)", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]\\\\", [("[a]\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), (BREAK, -1.0), ("b", R)]),
    ("a break b, aBREAK", [("a break b, aBREAK", 1.0)]),
    ("(a)(b)", [("ab", R)]),
    ("(a:1.1)(b)", [("ab", R)]),
    ("(a:1.2.3)", [("a:1.2.3", R)]),  # A1111 raises here; we keep the text
    # the docstring examples of A1111's parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), WEIGHT_TABLE)
def test_parse_weighted_table(prompt: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weighted(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def test_parse_weighted_a1111_exact_floats() -> None:
    got = dict(parse_weighted("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


# ---------------------------------------------------------------- parse_weighted properties

SYNTAX = list("()[]:\\ ab.1") + [" BREAK ", ":1.5)", ":0.5)", "\\(", "\\]"]
bracket_heavy = st.lists(st.sampled_from(SYNTAX), max_size=60).map("".join)
positive_syntax = st.lists(st.sampled_from([*"()[]:\\ ab.19", " BREAK ", ":1.5)"]), max_size=60).map("".join)


def _letters(text: str) -> str:
    """The ASCII lowercase letters of `text`, which no syntax ever consumes."""
    return "".join(c for c in text if c in string.ascii_lowercase)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), bracket_heavy))
def test_parse_weighted_never_raises_and_keeps_text(text: str) -> None:
    parsed = parse_weighted(text)
    assert parsed
    texts = "".join(frag for frag, weight in parsed if not (frag == BREAK and weight == -1.0))
    assert _letters(texts) == _letters(text)
    assert len(texts) <= len(text)
    for frag, weight in parsed:
        assert weight == 0.0 or MIN_WEIGHT <= abs(weight) <= MAX_WEIGHT
        assert frag != BREAK or weight == -1.0


@settings(max_examples=300, deadline=None)
@given(positive_syntax)
def test_weights_positive_without_explicit_nonpositive(text: str) -> None:
    assert all(weight > 0 for frag, weight in parse_weighted(text) if frag != BREAK)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]:\\B"), max_size=100))
def test_plain_text_is_one_fragment(text: str) -> None:
    assert parse_weighted(text) == [(text, 1.0)]


def _long_text(rng: random.Random) -> str:
    """About 10,000 characters drawn from the bracket-heavy alphabet (or any code point, one time in four)."""
    if rng.random() < 0.25:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(10_000))
    return "".join(rng.choices(SYNTAX, k=7_000))[:10_000]


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**32).map(lambda seed: _long_text(random.Random(seed))))
def test_long_bracket_heavy_strings(text: str) -> None:
    assert parse_weighted(text)
    assert len(prompts_per_step(text, 5)) == 5


PATHOLOGICAL = ["(" * 10_000, "[a" * 5_000, "(a" * 5_000, "\\" * 10_000, "[a|" * 3_000,
                "(a:99999999999999999999)" * 400, "[a:b:1e999]" * 900]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=[text[:12] for text in PATHOLOGICAL])
def test_pathological_long_strings(text: str) -> None:
    assert all(weight == 0.0 or MIN_WEIGHT <= abs(weight) <= MAX_WEIGHT for _, weight in parse_weighted(text))
    assert len(prompts_per_step(text, 3)) == 3


# ---------------------------------------------------------------- scheduling

SCHEDULE_TABLE = [
    ("[a:b:0.5]", 10, ["a"] * 5 + ["b"] * 5),
    ("[a:b:3]", 10, ["a"] * 3 + ["b"] * 7),
    ("[a:b:0.25]", 10, ["a"] * 2 + ["b"] * 8),
    ("[a:b:50]", 4, ["a"] * 4),
    ("[a:b:0]", 4, ["b"] * 4),
    ("x [a:0.5] y", 4, ["x  y", "x  y", "x a y", "x a y"]),
    ("[:b:0.5]", 4, ["", "", "b", "b"]),
    ("[a::0.5]", 4, ["a", "a", "", ""]),
    ("a [b: 3 ]", 4, ["a ", "a ", "a ", "a b"]),
    ("a [b : c : 1] d", 3, ["a b  d", "a  c  d", "a  c  d"]),
    ("[a|b]", 4, ["a", "b", "a", "b"]),
    ("[a|b|c]", 5, ["a", "b", "c", "a", "b"]),
    ("[fe|]male", 3, ["female", "male", "female"]),
    ("a[b:[c:d:2]:1]e", 3, ["abe", "ace", "ade"]),
    ("[[a|b]:c:2]", 4, ["a", "b", "c", "c"]),
    ("[(a:1.2):b:1] (c)", 2, ["(a:1.2) (c)", "b (c)"]),
    ("[[a:b:1]]", 2, ["[a]", "[b]"]),
    ("((a][:b:c [d:3]", 4, ["((a][:b:c "] * 3 + ["((a][:b:c d"]),
    # malformed: literal text
    ("a [unbalanced", 2, ["a [unbalanced"] * 2),
    ("[a:b:c]", 2, ["[a:b:c]"] * 2),
    ("[a:b:3", 2, ["[a:b:3"] * 2),
    ("x|y [a:b:1]", 2, ["x|y [a:b:1]"] * 2),
    ("[a:b:1] \\", 2, ["[a:b:1] \\"] * 2),
    ("(a:1.2) [b] \\(c\\)", 2, ["(a:1.2) [b] \\(c\\)"] * 2),
]


@pytest.mark.parametrize(("prompt", "steps", "expected"), SCHEDULE_TABLE)
def test_prompts_per_step_table(prompt: str, steps: int, expected: list[str]) -> None:
    assert prompts_per_step(prompt, steps) == expected


def test_prompt_schedule_a1111_doc_example() -> None:
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_prompts_per_step_no_steps() -> None:
    assert prompts_per_step("[a:b:0.5]", 0) == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from([*SYNTAX, "|", "[a:b:0.5]", ":3]"]),
                                                max_size=40).map("".join)),
       st.integers(1, 12))
def test_prompts_per_step_never_raises(text: str, steps: int) -> None:
    out = prompts_per_step(text, steps)
    assert len(out) == steps
    assert all(len(prompt) <= len(text) for prompt in out)
    if "[" not in text:
        assert out == [text] * steps


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.integers(0, 60))
def test_schedule_switch_step(steps: int, when: int) -> None:
    out = prompts_per_step(f"[a:b:{when}]", steps)
    switch = min(when, steps)
    assert out == ["a"] * switch + ["b"] * (steps - switch)


# ---------------------------------------------------------------- encoding on the tiny models


LONG = " ".join(["abcd"] * 80)  # character-level tokenizer: 4 tokens a word, 320 tokens


def test_long_prompt_is_chunked_not_truncated(sd: PromptEncoder) -> None:
    assert sd.count_tokens(LONG) == TokenCount(320, 375, 5)
    assert sd.chunk_count(LONG) == 5
    embeds = sd.encode(LONG).embeds
    assert embeds.shape == (1, 385, 32)
    changed = sd.encode(LONG[:-9] + "wxyz wxyz").embeds
    assert torch.equal(embeds[:, :308], changed[:, :308])
    assert not torch.allclose(embeds[:, 308:], changed[:, 308:])


def test_unit_weights_are_bit_identical(sd: PromptEncoder) -> None:
    plain = sd.encode("abcd efgh ijkl").embeds
    for emphasis in ("a1111", "none"):
        same = sd.encode("abcd (efgh:1.0) ((ijkl:1.0):1.0)", emphasis=emphasis).embeds
        assert torch.equal(same, plain)


def test_weight_scales_tokens_with_no_emphasis(sd: PromptEncoder) -> None:
    plain = sd.encode("abcd efgh ijkl").embeds[0]
    weighted = sd.encode("abcd (efgh:1.5) ijkl", emphasis="none").embeds[0]
    word = slice(5, 9)  # BOS, a b c d, then e f g h
    assert torch.equal(weighted[word], plain[word] * 1.5)
    assert torch.equal(weighted[:5], plain[:5]) and torch.equal(weighted[9:], plain[9:])
    moved = weighted[word] - plain[word]  # the shift points along each token's own embedding
    assert torch.allclose(torch.cosine_similarity(moved, plain[word], dim=-1), torch.ones(4), atol=1e-5)


def test_weight_a1111_emphasis_scales_word_relative_to_chunk(sd: PromptEncoder) -> None:
    plain = sd.encode("abcd efgh ijkl").embeds[0]
    weighted = sd.encode("abcd (efgh:1.5) ijkl").embeds[0]
    word = slice(5, 9)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4, abs=1e-6)
    # A1111: z * w, then one factor c = mean(z) / mean(z * w) for the whole chunk (c may be negative when the
    # chunk mean is near zero, as with random weights)
    w = torch.ones(77, 1)
    w[word] = 1.5
    c = plain.mean() / (plain * w).mean()
    torch.testing.assert_close(weighted, plain * w * c, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weighted[word], plain[word])


def test_negative_padded_to_min_chunks(sd: PromptEncoder) -> None:
    positive = sd.encode(LONG)
    negative = sd.encode("blurry", min_chunks=positive.chunks)
    assert negative.embeds.shape == positive.embeds.shape
    assert torch.equal(negative.embeds[:, :77], sd.encode("blurry").embeds)
    assert torch.equal(negative.embeds[:, 77:154], sd.encode("").embeds)


def test_break_starts_a_new_chunk(sd: PromptEncoder) -> None:
    assert sd.chunk_count("abcd BREAK efgh") == 2
    embeds = sd.encode("abcd BREAK efgh").embeds
    assert embeds.shape == (1, 154, 32)
    assert torch.equal(embeds[:, :77], sd.encode("abcd").embeds)
    assert torch.equal(embeds[:, 77:], sd.encode("efgh").embeds)


def test_comma_backtrack_and_token_count(sd: PromptEncoder) -> None:
    prompt = "abcd " * 17 + "ab, efgh ijkl"  # the comma is token 71; "efgh" would end chunk 1
    tokenizer = sd.tokenizers[0]
    first, second = tokenize_chunks(tokenizer, prompt)
    assert first.tokens[71] == tokenizer.convert_tokens_to_ids(",</w>")
    assert first.tokens[72] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(list(second.tokens[1:5])) == ["e", "f", "g", "h</w>"]
    count = sd.count_tokens(prompt)
    assert (count.tokens, count.limit, count.chunks) == (83, 150, 2)
    assert str(count) == "83/150 tokens, 2 chunks"


def test_chunk_layout(sd: PromptEncoder) -> None:
    tokenizer = sd.tokenizers[0]
    (chunk,) = tokenize_chunks(tokenizer, "(ab:2)")
    assert len(chunk.tokens) == len(chunk.weights) == 77
    assert chunk.tokens[0] == tokenizer.bos_token_id and chunk.tokens[3] == tokenizer.eos_token_id
    assert chunk.weights[:4] == (1.0, 2.0, 2.0, 1.0)
    assert len(tokenize_chunks(tokenizer, "", min_chunks=3)) == 3


def test_count_tokens_with_tokenizer_only(sd: PromptEncoder) -> None:
    tokenizer = sd.tokenizers[0]
    assert count_tokens_with(tokenizer, "") == TokenCount(0, 75, 1)
    assert str(count_tokens_with(tokenizer, "abcd")) == "4/75 tokens, 1 chunk"
    assert count_tokens_with(tokenizer, "[abcd:abcdefgh:0.5]").tokens == 8
    assert count_tokens_with(tokenizer, "abcd BREAK efgh").tokens == 79  # A1111 counts the padding


def test_clip_skip_uses_penultimate_layer_with_final_norm(sd: PromptEncoder) -> None:
    tokenizer, encoder = sd.tokenizers[0], sd.text_encoders[0]
    skip = PromptEncoder([tokenizer], [encoder], pooled=False, clip_skip=2).encode("abcd").embeds
    ids = torch.tensor([tokenize_chunks(tokenizer, "abcd")[0].tokens])
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    assert torch.allclose(skip, expected) and not torch.allclose(skip, sd.encode("abcd").embeds)


def test_sdxl_shapes_and_first_chunk_pooled(sdxl: PromptEncoder) -> None:
    short = sdxl.encode("abcd efgh")
    assert short.embeds.shape == (1, 77, 64) and short.pooled is not None and short.pooled.shape == (1, 32)
    long = sdxl.encode(LONG)
    assert long.embeds.shape == (1, 385, 64)
    first = torch.tensor([tokenize_chunks(sdxl.tokenizers[1], LONG)[0].tokens])
    with torch.no_grad():
        assert torch.equal(long.pooled, sdxl.text_encoders[1](first).text_embeds)
    assert sdxl.encode("abcd BREAK efgh").embeds.shape == (1, 154, 64)


def test_cache_and_per_step_encoding(sd: PromptEncoder, tiny) -> None:
    # caching across calls is the engine's PromptCache (test_engine counts encoder calls); encoding is deterministic
    from pipelines.denoise.stages import PromptCache, build_conditioning
    from tests.conftest import stage_spec

    assert torch.equal(sd.encode("abcd").embeds, sd.encode("abcd").embeds)
    at = build_conditioning(tiny, stage_spec(prompt="[abcd:" + LONG + ":0.5]", steps=4), PromptCache(), 4)
    steps = [at(i) for i in range(4)]  # the stages' per-step conditioning: every step padded to the same chunks
    assert [s.cond.shape[1] // 77 for s in steps] == [5, 5, 5, 5]
    assert steps[0] is steps[1] and steps[2] is steps[3] and steps[1] is not steps[2]
    assert torch.equal(steps[3].cond, sd.encode(LONG).embeds)


def test_follows_encoder_dtype(tiny_dir: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_dir / "text_encoder").to(torch.float64)
    assert PromptEncoder([tokenizer], [encoder], pooled=False).encode("(ab:1.3)").embeds.dtype == torch.float64


def test_bad_arguments(sd: PromptEncoder) -> None:
    with pytest.raises(ValueError, match="emphasis"):
        sd.encode("a", emphasis="loud")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip_skip"):
        PromptEncoder(sd.tokenizers, sd.text_encoders, pooled=False, clip_skip=0)
    with pytest.raises(ValueError, match="2 item"):
        PromptEncoder(sd.tokenizers, sd.text_encoders, pooled=True)


def test_parser_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; import pipelines.prompts.parser as p; "
            "import pipelines.prompts.encoding as e; "
            "assert p.parse_weighted('(a)') == [('a', 1.1)]; assert p.prompts_per_step('[a|b]', 2) == ['a', 'b']")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
