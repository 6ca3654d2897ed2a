"""Guidance schedules: the textual form, scale values, UNet pass counts, CFG (+ rescale) and the plot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipelines.denoise.guidance import apply_cfg, plot_schedule
from pipelines.errors import ValidationError
from pipelines.request.cfg import (
    GuidanceSchedule,
    format_cfg,
    needs_uncond,
    parse_cfg,
    progress_of,
    scales_for_steps,
    unet_evaluations,
)

G = GuidanceSchedule

PARSE_TABLE = [
    ("7", G("constant", (7.0,)), "7"),
    ("7.5", G("constant", (7.5,)), "7.5"),
    ("  7.50 ", G("constant", (7.5,)), "7.5"),
    ("constant(7)", G("constant", (7.0,)), "7"),
    ("linear(4,9)", G("linear", (4.0, 9.0)), "linear(4,9)"),
    ("LINEAR ( 4 , 9 )", G("linear", (4.0, 9.0)), "linear(4,9)"),
    ("cosine(9,4)", G("cosine", (9.0, 4.0)), "cosine(9,4)"),
    ("step(9,5,0.5)", G("step", (9.0, 5.0, 0.5)), "step(9,5,0.5)"),
    ("interval(7.5,0.2,0.8)", G("interval", (7.5, 0.2, 0.8)), "interval(7.5,0.2,0.8)"),
    ("linear(4,9), rescale=0.7", G("linear", (4.0, 9.0), 0.7), "linear(4,9), rescale=0.7"),
    ("7 ,Rescale = 0.7", G("constant", (7.0,), 0.7), "7, rescale=0.7"),
    ("7, rescale=0", G("constant", (7.0,)), "7"),
    ("1e1", G("constant", (10.0,)), "10"),
    ("interval(.5,0,1)", G("interval", (0.5, 0.0, 1.0)), "interval(0.5,0,1)"),
]


@pytest.mark.parametrize(("text", "schedule", "canonical"), PARSE_TABLE)
def test_parse_and_format(text, schedule, canonical):
    parsed = parse_cfg(text)
    assert parsed == schedule
    assert format_cfg(parsed) == canonical
    assert format_cfg(parse_cfg(canonical)) == canonical
    assert str(parsed) == canonical


@pytest.mark.parametrize(("value", "expected"), [(7, G("constant", (7.0,))), (7.5, G("constant", (7.5,)))])
def test_parse_accepts_numbers(value, expected):
    assert parse_cfg(value) == expected


INVALID = [
    "abc",
    "linear(4)",
    "interval(7,0.8,0.2)",
    "nan",
    "inf",
    "7, rescale=2",
    "",
    "   ",
    "31",
    "-1",
    "linear(4,99)",
    "step(9,5,1.5)",
    "interval(7,0.2,0.2)",
    "7,5",
    "foo(1,2)",
    "linear(4,9) rescale=0.7",
    "linear(4,9), rescale=nan",
]


@pytest.mark.parametrize("text", INVALID)
def test_parse_rejects(text):
    with pytest.raises(ValidationError, match=r"linear\(4,9\)") as info:
        parse_cfg(text)
    assert info.value.field == "cfg"
    assert info.value.value == text


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 31.0, -0.5, True, None])
def test_parse_rejects_non_text(value):
    with pytest.raises(ValidationError, match=r"linear\(4,9\)"):
        parse_cfg(value)


def test_constructor_validates():
    with pytest.raises(ValidationError, match="0 <= lo < hi <= 1"):
        G("interval", (7.0, 0.8, 0.2))
    with pytest.raises(ValidationError, match="takes 2"):
        G("linear", (7.0,))


SCALE_TABLE = [
    # text, scale at progress 0, 0.5, 1
    ("7", 7.0, 7.0, 7.0),
    ("linear(4,9)", 4.0, 6.5, 9.0),
    ("linear(9,4)", 9.0, 6.5, 4.0),
    ("cosine(9,4)", 9.0, 6.5, 4.0),
    ("cosine(4,9)", 4.0, 6.5, 9.0),
    ("step(9,5,0.5)", 9.0, 5.0, 5.0),
    ("interval(7.5,0.2,0.8)", 1.0, 7.5, 1.0),
    ("interval(7.5,0,1)", 7.5, 7.5, 7.5),
]


@pytest.mark.parametrize(("text", "at0", "at_half", "at1"), SCALE_TABLE)
def test_scale_at(text, at0, at_half, at1):
    s = parse_cfg(text)
    assert s.scale_at(0.0) == at0
    assert s.scale_at(0.5) == pytest.approx(at_half)
    assert s.scale_at(1.0) == at1


def test_cosine_is_slow_at_the_ends():
    s = parse_cfg("cosine(4,9)")
    assert s.scale_at(0.1) - 4.0 < parse_cfg("linear(4,9)").scale_at(0.1) - 4.0


@pytest.mark.parametrize("progress", [-0.1, 1.1, float("nan")])
def test_scale_at_rejects_out_of_range(progress):
    with pytest.raises(ValidationError):
        parse_cfg("7").scale_at(progress)


def test_progress_and_scales_for_steps():
    assert [progress_of(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress_of(0, 1) == 0.0
    assert scales_for_steps(parse_cfg("linear(4,8)"), 5) == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert scales_for_steps(parse_cfg("interval(7,0.25,0.75)"), 5) == [1.0, 7.0, 7.0, 7.0, 1.0]
    with pytest.raises(ValidationError):
        progress_of(5, 5)
    with pytest.raises(ValidationError):
        progress_of(0, 0)


def test_needs_uncond():
    assert needs_uncond(7.5)
    assert needs_uncond(0.0)
    assert needs_uncond(1.0001)
    assert not needs_uncond(1.0)


def test_unet_evaluations():
    constant = unet_evaluations(parse_cfg("7.5"), 20)
    assert constant == 40
    assert unet_evaluations(parse_cfg("7.5"), 20, batch_tiles=4) == 160
    # interval [0.2, 0.8] guides steps 4..15 of 0..19 (12 steps): 12*2 + 8 = 32 passes, 20% fewer.
    assert unet_evaluations(parse_cfg("interval(7.5,0.2,0.8)"), 20) == 32
    # A narrower interval saves more: [0.3, 0.6] guides 6 steps -> 26 passes, 35% fewer.
    narrow = unet_evaluations(parse_cfg("interval(7.5,0.3,0.6)"), 20)
    assert narrow == 26
    assert narrow <= 0.7 * constant
    assert unet_evaluations(parse_cfg("1"), 20) == 20


def _schedules():
    scale = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)
    unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
    bounds = st.tuples(unit, unit).filter(lambda b: b[0] != b[1]).map(sorted).map(tuple)
    kinds = st.one_of(
        st.tuples(st.just("constant"), st.tuples(scale)),
        st.tuples(st.sampled_from(["linear", "cosine"]), st.tuples(scale, scale)),
        st.tuples(st.just("step"), st.tuples(scale, scale, unit)),
        st.tuples(st.just("interval"), st.tuples(scale, bounds).map(lambda t: (t[0], *t[1]))),
    )
    rescale = st.one_of(st.just(0.0), unit)
    return st.builds(lambda kp, r: G(kp[0], kp[1], r), kinds, rescale)


@given(_schedules(), st.floats(min_value=0.0, max_value=1.0))
def test_property_round_trip_and_bounds(schedule, progress):
    text = format_cfg(schedule)
    assert parse_cfg(text) == schedule
    assert format_cfg(parse_cfg(text)) == text
    value = schedule.scale_at(progress)
    scales = schedule.params[:1] if schedule.kind in ("constant", "interval") else schedule.params[:2]
    assert min(scales) <= value <= max(scales) or (schedule.kind == "interval" and value == 1.0)


def _pair(seed=0, shape=(2, 4, 8, 8), dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    uncond = torch.randn(shape, generator=gen).to(dtype)
    cond = (uncond + 0.3 * torch.randn(shape, generator=gen)).to(dtype)
    return uncond, cond


def test_apply_cfg_plain_is_exact():
    uncond, cond = _pair()
    assert torch.equal(apply_cfg(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))
    assert torch.equal(apply_cfg(uncond, cond, 7.5, rescale=0.0), uncond + 7.5 * (cond - uncond))


def test_apply_cfg_without_uncond():
    _, cond = _pair()
    assert apply_cfg(None, cond, 1.0) is cond
    with pytest.raises(ValidationError):
        apply_cfg(None, cond, 7.5)


def test_apply_cfg_rescale_full_matches_cond_std():
    uncond, cond = _pair()
    out = apply_cfg(uncond, cond, 9.0, rescale=1.0)
    dims = (1, 2, 3)
    assert torch.allclose(out.std(dim=dims), cond.std(dim=dims), rtol=1e-5)
    assert not torch.allclose(apply_cfg(uncond, cond, 9.0).std(dim=dims), cond.std(dim=dims), rtol=1e-2)


def test_apply_cfg_rescale_blends():
    uncond, cond = _pair()
    plain = apply_cfg(uncond, cond, 9.0)
    full = apply_cfg(uncond, cond, 9.0, rescale=1.0)
    assert torch.allclose(apply_cfg(uncond, cond, 9.0, rescale=0.7), 0.7 * full + 0.3 * plain, atol=1e-5)


def test_apply_cfg_keeps_dtype_and_any_canvas_shape():
    uncond, cond = _pair(shape=(1, 4, 24, 40), dtype=torch.bfloat16)
    out = apply_cfg(uncond, cond, 7.0, rescale=0.7)
    assert out.dtype == torch.bfloat16
    assert out.shape == cond.shape
    assert torch.isfinite(out.float()).all()


def test_apply_cfg_rescale_constant_prediction_is_finite():
    cond = torch.ones(1, 4, 8, 8)
    out = apply_cfg(cond.clone(), cond, 7.0, rescale=0.7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("text", ["7", "linear(4,9)", "interval(7.5,0.2,0.8), rescale=0.7", "step(9,5,0.5)"])
def test_plot_schedule(text):
    img = plot_schedule(parse_cfg(text), 20, size=(300, 140))
    assert img.mode == "RGB"
    assert img.size == (300, 140)
    colors = img.getcolors(maxcolors=300 * 140)
    assert len(colors) > 2
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert any(color != (255, 255, 255) for _, color in colors)


def test_plot_schedule_single_step():
    img = plot_schedule(parse_cfg("7"), 1)
    assert img.size == (360, 160)
    assert len(img.getcolors(maxcolors=360 * 160)) > 2
