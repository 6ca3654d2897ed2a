"""Every sampler the UI offers runs a real (tiny) txt2img with only requirements.txt installed."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.denoise.schedulers import SAMPLERS, make_scheduler, sampler_names
from pipelines.metadata import request_from_infotext


def test_the_ui_offers_every_sampler(engine):
    from pipelines.serving.service import make_backend

    assert make_backend(engine).choices()["samplers"] == sampler_names() == list(SAMPLERS)


@pytest.mark.parametrize("sampler", sampler_names())
def test_each_sampler_runs_two_steps(engine, req_factory, sampler):
    res = engine.generate(req_factory(sampler=sampler, steps=2, cfg="5"), save=False)
    pixels = np.asarray(res.images[0].convert("RGB"), dtype=np.int16)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0  # decoded, not a blank or NaN (black) image
    sched = make_scheduler(sampler, engine.manager.get("tiny").pipe.scheduler.config)
    sched.set_timesteps(2)
    model_calls = len(sched.timesteps)  # 2, or 3 for Heun (second-order correction) and PNDM (PLMS warm-up)
    assert model_calls >= 2 and res.stats["unet_evals"] == 2 * model_calls  # cond + uncond rows at CFG 5
    assert request_from_infotext(res.infotexts[0]).sampler == sampler
