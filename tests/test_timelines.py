"""A1111's prompt-editing timelines: the default rule, the legacy rule and the hires-pass form (issue 18).

The expected per-step prompts follow A1111's `get_learned_conditioning_prompt_schedules` (modules/prompt_parser.py,
1.6+), whose option help reads: "old: If N < 1, it's a fraction of steps (and hires fix uses range from 0 to 1),
if N >= 1, it's an absolute number of steps; new: If N has a decimal point in it, it's a fraction of steps (and
hires fix uses range from 1 to 2), otherwise it's an absolute number of steps". Entry i is step i + 1.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.errors import ValidationError
from pipelines.prompts.parser import prompt_schedule, prompts_per_step
from pipelines.request.schema import GenerationRequest, HiresConfig
from pipelines.request.validation import validate

# (prompt, steps, expected with A1111's default, expected with the legacy rule); one pass, no hires
SINGLE_PASS = [
    ("[a:b:0.5]", 10, ["a"] * 5 + ["b"] * 5, ["a"] * 5 + ["b"] * 5),
    ("[a:b:.5]", 10, ["a"] * 5 + ["b"] * 5, ["a"] * 5 + ["b"] * 5),
    ("[a:b:3]", 10, ["a"] * 3 + ["b"] * 7, ["a"] * 3 + ["b"] * 7),
    ("[a:b:1]", 4, ["a"] + ["b"] * 3, ["a"] + ["b"] * 3),
    ("[a:b:0]", 4, ["b"] * 4, ["b"] * 4),
    # the numbers the two rules read differently: written with "." and >= 1
    ("a [b:1.5] c", 10, ["a  c"] * 10, ["a  c"] + ["a b c"] * 9),
    ("[a:b:1.0]", 4, ["a"] * 4, ["a"] + ["b"] * 3),
    ("[a:b:3.0]", 10, ["a"] * 10, ["a"] * 3 + ["b"] * 7),
    ("[a:b:2.5]", 10, ["a"] * 10, ["a"] * 2 + ["b"] * 8),
    # no "." but < 1 (an exponent): a step number for A1111, a fraction for the legacy rule
    ("[a:b:5e-1]", 10, ["b"] * 10, ["a"] * 5 + ["b"] * 5),
    ("[a:b:1e1]", 20, ["a"] * 10 + ["b"] * 10, ["a"] * 10 + ["b"] * 10),
    # nested and alternation: unchanged
    ("a[b:[c:d:2]:1]e", 3, ["abe", "ace", "ade"], ["abe", "ace", "ade"]),
    ("[a|b]", 4, ["a", "b", "a", "b"], ["a", "b", "a", "b"]),
    ("[[a|b]:c:0.5]", 4, ["a", "b", "c", "c"], ["a", "b", "c", "c"]),
]


@pytest.mark.parametrize(("prompt", "steps", "default", "legacy"), SINGLE_PASS)
def test_single_pass_timeline_table(prompt: str, steps: int, default: list[str], legacy: list[str]) -> None:
    assert prompts_per_step(prompt, steps) == default
    assert prompts_per_step(prompt, steps, timeline="a1111") == default
    assert prompts_per_step(prompt, steps, timeline="legacy") == legacy


# (prompt, first-pass steps, hires steps, hires pass with A1111's default, hires pass with the legacy rule)
HIRES_PASS = [
    ("a [b:1.5] c", 20, 10, ["a  c"] * 5 + ["a b c"] * 5, ["a  c"] + ["a b c"] * 9),
    ("[a:b:1.25]", 20, 10, ["a"] * 2 + ["b"] * 8, ["a"] + ["b"] * 9),
    ("[a:b:2.0]", 20, 10, ["a"] * 10, ["a"] * 2 + ["b"] * 8),
    ("[a:b:0.5]", 20, 10, ["b"] * 10, ["a"] * 5 + ["b"] * 5),  # a first-pass fraction: over before the refine
    ("[a:b:5]", 20, 10, ["b"] * 10, ["a"] * 5 + ["b"] * 5),  # a first-pass step: over before the refine
    ("[a:b:25]", 20, 10, ["a"] * 5 + ["b"] * 5, ["a"] * 10),  # step 25 = hires step 5
    ("[a:b:30]", 20, 4, ["a"] * 4, ["a"] * 4),
    ("[a|b]", 20, 4, ["a", "b", "a", "b"], ["a", "b", "a", "b"]),
]


@pytest.mark.parametrize(("prompt", "first", "hires", "default", "legacy"), HIRES_PASS)
def test_hires_pass_timeline_table(prompt: str, first: int, hires: int, default: list[str], legacy: list[str]) -> None:
    assert prompts_per_step(prompt, hires, first_pass_steps=first) == default
    assert prompts_per_step(prompt, hires, timeline="legacy", first_pass_steps=first) == legacy


def test_first_pass_sees_the_before_text_of_a_hires_switch() -> None:
    """A1111 builds the first pass's conds without hires steps: 1.5 x steps is past the end, so "before" holds."""
    assert prompts_per_step("a [b:1.5] c", 20) == ["a  c"] * 20
    assert prompts_per_step("a [b:c:25] d", 20) == ["a b d"] * 20


def test_a1111_doctests() -> None:
    """The examples in A1111's docstring: 10 steps, then (10, 10) with hires steps."""
    assert prompt_schedule("a [b:.5] c", 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedule("a [b:3]", 10) == [(3, "a "), (10, "a b")]
    assert prompt_schedule("a [b : c : 1] d", 10) == [(1, "a b  d"), (10, "a  c  d")]
    assert prompt_schedule("a [b:.5] c", 10, first_pass_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, first_pass_steps=10) == [(5, "a  c"), (10, "a b c")]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(0, 60), st.integers(1, 40))
def test_whole_numbers_mean_the_same_in_both_rules_outside_hires(steps: int, when: int, first: int) -> None:
    text = f"[a:b:{when}]"
    assert prompts_per_step(text, steps) == prompts_per_step(text, steps, timeline="legacy")
    hires = prompts_per_step(text, steps, first_pass_steps=first)
    switch = max(0, min(when - first, steps))
    assert hires == ["a"] * switch + ["b"] * (steps - switch)


def test_unknown_timeline_and_request_validation() -> None:
    with pytest.raises(ValueError, match="timeline"):
        prompts_per_step("[a:b:1]", 3, timeline="old")  # type: ignore[arg-type]
    assert validate(GenerationRequest(prompt_timeline="legacy")).prompt_timeline == "legacy"
    with pytest.raises(ValidationError, match="prompt_timeline.*a1111, legacy"):
        validate(GenerationRequest(prompt_timeline="old"))


def test_refine_spec_uses_the_hires_form() -> None:
    from pipelines.denoise.stages import StageSpec, stage_prompts
    from pipelines.hires.refine import refine_spec

    req = GenerationRequest(prompt="a [b:1.5] c", steps=20, hires=HiresConfig(scale=2, steps=10, denoise=0.5))
    stage1 = StageSpec(prompt=req.prompt, negative_prompt="[x:y:1.5]", width=64, height=64, steps=20,
                       sampler="Euler", cfg="7", seeds=[1])
    assert stage_prompts(stage1, 20) == (["a  c"] * 20, ["x"] * 20)
    refine = refine_spec(req, stage1, torch.zeros(1, 4, 16, 16))
    assert refine.first_pass_steps == 20
    assert stage_prompts(refine, 10) == (["a  c"] * 5 + ["a b c"] * 5, ["x"] * 5 + ["y"] * 5)


@pytest.mark.parametrize(("timeline", "stage2"), [
    ("a1111", ["a  c", "a b c"]),
    ("legacy", ["a  c", "a b c"]),
])
def test_engine_two_stage_run_schedules_each_pass(engine, req_factory, monkeypatch, timeline, stage2) -> None:
    """A real two-stage run on the tiny model: the per-step prompts each pass conditions on (a spy)."""
    from pipelines.denoise import stages

    seen: list[tuple[int | None, list[str]]] = []
    real = stages.stage_prompts

    def spy(spec, steps):
        out = real(spec, steps)
        seen.append((spec.first_pass_steps, out[0]))
        return out

    monkeypatch.setattr(stages, "stage_prompts", spy)
    req = req_factory(prompt="a [b:1.5] c", steps=2, prompt_timeline=timeline,
                      hires=HiresConfig(scale=1.5, steps=2, denoise=1.0))
    result = engine.generate(req, save=False)
    stage1 = ["a  c"] * 2 if timeline == "a1111" else ["a  c", "a b c"]
    assert seen == [(None, stage1), (2, stage2)]
    assert ("Old prompt editing timelines: True" in result.infotexts[0]) == (timeline == "legacy")


def test_prompt_timeline_in_cli_api_ui_and_metadata(tmp_path) -> None:
    """The field reaches the request from every entry point, and the infotext writes and reads it as A1111 does."""
    from cli import _values, build_parser
    from pipelines.a1111 import parse_infotext
    from pipelines.metadata import infotext, request_from_infotext
    from tests.test_ui import FakeBackend, by_label, handler, initial_data
    from ui.api import GENERATE_PARAMS
    from ui.app import create_demo

    args = build_parser().parse_args(["generate", "--prompt", "x", "--prompt-timeline", "legacy"])
    assert _values(args)["prompt_timeline"] == "legacy"
    assert GENERATE_PARAMS["prompt_timeline"] is str
    backend = FakeBackend(tmp_path / "outputs")
    demo = create_demo(backend, queue_size=4)
    fn = handler(demo, "on_generate")
    data = initial_data(fn)
    assert data[by_label(fn, "Prompt timeline")] == "a1111"
    data[by_label(fn, "Prompt timeline")] = "legacy"
    list(fn.fn(data))
    assert next(v for k, v in backend.calls if k == "generate")["prompt_timeline"] == "legacy"
    sent = {getattr(c, "label", None): v for c, v in handler(demo, "on_send").fn({"prompt_timeline": "legacy"}).items()}
    assert sent["Prompt timeline"] == "legacy"

    legacy = GenerationRequest(prompt="a [b:1.5] c", prompt_timeline="legacy", seed=3)
    text = infotext(legacy, seed=3, model_hash="")
    assert parse_infotext(text)["Old prompt editing timelines"] == "True" and "Tessera:" not in text
    assert request_from_infotext(text) == legacy
    assert "Old prompt editing" not in infotext(GenerationRequest(prompt="a [b:1.5] c"), seed=3, model_hash="")
    a1111 = "a [b:1.5] c\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512"
    assert request_from_infotext(a1111).prompt_timeline == "a1111"
    assert request_from_infotext(a1111 + ", Old prompt editing timelines: True").prompt_timeline == "legacy"
    # A1111's backcompat: images from before 1.6.0 with a "[" in the prompt used the old timelines
    assert request_from_infotext(a1111 + ", Version: v1.5.2").prompt_timeline == "legacy"
    assert request_from_infotext(a1111 + ", Version: v1.6.0").prompt_timeline == "a1111"
    assert request_from_infotext("a b\nSteps: 20, Seed: 1, Version: v1.5.2").prompt_timeline == "a1111"
