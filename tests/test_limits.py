"""The engine's `Limits` are the ones every check uses: looser limits let bigger requests through, tighter ones
refuse what the defaults allow, through `Engine.generate` (whose validation every entry point shares)."""

from __future__ import annotations

import pytest

from pipelines.engine import Engine
from pipelines.errors import ValidationError
from pipelines.request.limits import Limits
from pipelines.request.schema import HiresConfig, TileConfig
from tests.conftest import tiny_request


def test_loosened_max_side_accepts_width_10000(manager, tmp_path):
    engine = Engine(manager, tmp_path / "out", limits=Limits(max_side=16384))
    req = tiny_request(width=10000, height=64, steps=1, tiling=TileConfig(mode="on", size=64, overlap=16))
    res = engine.generate(req, save=False)
    assert res.images[0].size == (10000, 64)


def test_default_limits_still_refuse_width_10000(engine):
    with pytest.raises(ValidationError, match="width.*between 64 and 8192"):
        engine.generate(tiny_request(width=10000, height=64, steps=1), save=False)


def test_every_group_is_checked_against_the_engines_limits(manager, tmp_path):
    """Tightened limits hold for the top-level size, the hires target and the outpaint sides alike."""
    engine = Engine(manager, tmp_path / "out", limits=Limits(max_side=512, max_steps=4))
    engine.check(tiny_request(width=512, height=64, steps=4))
    with pytest.raises(ValidationError, match="width.*between 64 and 512"):
        engine.check(tiny_request(width=576, height=64))
    with pytest.raises(ValidationError, match="steps.*between 1 and 4"):
        engine.check(tiny_request(steps=5))
    with pytest.raises(ValidationError, match="hires_scale.*512px"):
        engine.check(tiny_request(width=256, height=64, hires=HiresConfig(scale=2.5, upscaler="lanczos")))
