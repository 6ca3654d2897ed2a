"""AND (composable diffusion, A1111 syntax): the split, the counted UNet evaluations, the combined prediction with
a closed-form fake UNet, ControlNet rows, SDXL pooled per part, and the part limit."""

from __future__ import annotations

import pytest
import torch

from pipelines.denoise.guidance import apply_cfg
from pipelines.denoise.loop import Conditioning, ControlInput, LoopInputs, LoopStats, denoise
from pipelines.denoise.stages import run_stage
from pipelines.errors import ValidationError
from pipelines.prompts.composable import split_and
from pipelines.request.cfg import parse_cfg, scales_for_steps
from pipelines.request.checks import MAX_AND_PARTS, check_and_parts
from tests.conftest import stage_spec


def text_term(enc: torch.Tensor, channels: int) -> torch.Tensor:
    """10 x the mean over tokens of the first `channels` features, one value per row and channel."""
    return 10 * enc.float().mean(dim=1)[:, :channels, None, None]


class TextUNet:
    """out = 0.5 x + mean(text embedding of the row) (+ mean of the pooled embedding and control residual):
    pointwise, and every conditional row's output is known in closed form."""

    dtype = torch.float32

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict=False):
        self.calls.append({"rows": sample.shape[0], "enc": encoder_hidden_states.clone(),
                           "added": None if added_cond_kwargs is None else dict(added_cond_kwargs),
                           "down": down_block_additional_residuals})
        out = 0.5 * sample.float() + text_term(encoder_hidden_states, sample.shape[1])
        if added_cond_kwargs is not None:
            out = out + added_cond_kwargs["text_embeds"].float().mean(dim=1)[:, None, None, None]
        if down_block_additional_residuals is not None:
            out = out + down_block_additional_residuals[0].float()
        return (out.to(sample.dtype),)


class IdentityScheduler:
    """A one-line scheduler: the next latents are the model output, so `denoise` returns the guided prediction."""

    config: dict = {}
    order = 1

    def scale_model_input(self, x, t):
        return x

    def step(self, model_output, t, latents, return_dict=False):
        return (model_output,)


SPLIT_TABLE = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat AND a dog :1.2", [("a cat", 1.0), (" a dog", 1.2)]),
    ("a cat:0.5 AND a dog : -0.3", [("a cat", 0.5), (" a dog", -0.3)]),
    ("a cat :1.2", [("a cat", 1.2)]),
    ("(red:1.3) fox AND [a:b:0.5] BREAK c", [("(red:1.3) fox", 1.0), (" [a:b:0.5] BREAK c", 1.0)]),
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),  # \bAND\b: a word, not a part of one
    ("a and b", [("a and b", 1.0)]),  # lowercase is text
    ("a AND AND b", [("a", 1.0), ("", 1.0), (" b", 1.0)]),
    ("a :1.", [("a", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), SPLIT_TABLE)
def test_split_and_matches_a1111(text, expected):
    assert split_and(text) == expected


def test_part_limit_has_a_clear_message():
    check_and_parts("prompt", " AND ".join(["x"] * MAX_AND_PARTS))
    with pytest.raises(ValidationError, match=r"`prompt` may have at most 8 parts joined by AND"):
        check_and_parts("prompt", " AND ".join(["x"] * (MAX_AND_PARTS + 1)))


def test_request_validation_refuses_too_many_parts():
    from pipelines.request.schema import GenerationRequest
    from pipelines.request.validation import validate

    with pytest.raises(ValidationError, match="`prompt` may have at most"):
        validate(GenerationRequest(prompt=" AND ".join("abcdefghij")))
    with pytest.raises(ValidationError, match="`hires_prompt` may have at most"):
        from pipelines.request.schema import HiresConfig

        validate(GenerationRequest(hires=HiresConfig(scale=2, prompt=" AND ".join("abcdefghij"))))


_spec = stage_spec


def test_one_part_equals_the_plain_prompt_bit_for_bit(tiny, engine):
    """No AND: the real tiny UNet gives the same latents as the loop fed the plain conditioning directly."""
    spec = _spec(prompt="a (red:1.2) fox, [snow:rain:0.5] BREAK night")
    ours = run_stage(tiny, spec, cache=engine.prompt_cache).latents
    weighted_one = run_stage(tiny, _spec(prompt=spec.prompt + " :1"), cache=engine.prompt_cache).latents
    assert torch.equal(ours, weighted_one)
    from pipelines.prompts.encoding import PromptEncoder

    enc = PromptEncoder(tiny.tokenizers, tiny.text_encoders, pooled=False)
    from pipelines.prompts.parser import prompts_per_step

    texts = prompts_per_step(spec.prompt, 4)
    chunks = max(enc.chunk_count(t) for t in {*texts, "blur"})
    neg = enc.encode("blur", min_chunks=chunks).embeds
    plain = {t: Conditioning(enc.encode(t, min_chunks=chunks).embeds, neg) for t in set(texts)}
    from pipelines.denoise.schedulers import make_scheduler
    from pipelines.denoise.stages import _timesteps, initial_noise

    sched = make_scheduler("DDIM", tiny.pipe.scheduler.config)
    timesteps = _timesteps(sched, spec, "cpu")
    noise, _ = initial_noise([3], (4, 8, 8), "cpu", torch.float32)
    direct = denoise(LoopInputs(unet=tiny.unet, scheduler=sched, latents=noise * sched.init_noise_sigma,
                                timesteps=timesteps, conditioning=lambda i: plain[texts[i]], scales=[7.0] * 4))
    assert torch.equal(ours, direct)


@pytest.mark.parametrize(("prompt", "weights"), [("a cat AND a dog :1.2", (1.0, 1.2)),
                                                 ("a cat :0.5 AND a dog :0.5", (0.5, 0.5))])
def test_two_parts_count_the_formula_of_unet_evaluations(tiny, engine, prompt, weights):
    """Per step: one evaluation per part, plus the unconditional one where the scale is not 1 or the weights do
    not sum to 1; all rows in one UNet call per step."""
    spy = TextUNet()
    spec = _spec(prompt=prompt, steps=10, cfg="interval(7,0.3,0.6)")
    res = run_stage(tiny, spec, cache=engine.prompt_cache, unet=spy)
    scales = scales_for_steps(parse_cfg(spec.cfg), 10)
    expected = [2 + (1 if s != 1.0 or sum(weights) != 1.0 else 0) for s in scales]
    assert [c["rows"] for c in spy.calls] == expected
    assert res.stats.unet_evals == sum(expected) and res.stats.unet_calls == 10


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_combined_prediction_equals_the_formula(rescale):
    """uncond + sum w_i (cond_i - uncond), then CFG (and rescale) on that, for a closed-form UNet."""
    g = torch.Generator().manual_seed(1)
    u, c1, c2 = (torch.randn(1, 6, 8, generator=g) for _ in range(3))  # 6 tokens, 8 features
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = Conditioning(cond=c1, uncond=u, extra=(c2,), weights=(0.7, 1.3))
    out = denoise(LoopInputs(unet=TextUNet(), scheduler=IdentityScheduler(), latents=x, timesteps=[torch.tensor(500)],
                             conditioning=lambda i: cond, scales=[6.0], rescale=rescale))

    def pred(e):
        return 0.5 * x + text_term(e, 4)

    combined = pred(u) + 0.7 * (pred(c1) - pred(u)) + 1.3 * (pred(c2) - pred(u))
    expected = apply_cfg(pred(u), combined, 6.0, rescale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_weights_summing_to_one_at_scale_one_skip_the_unconditional_pass():
    x = torch.randn(1, 4, 8, 8)
    c1, c2 = torch.full((1, 3, 4), 1.0), torch.full((1, 3, 4), 3.0)
    cond = Conditioning(cond=c1, uncond=torch.zeros(1, 3, 4), extra=(c2,), weights=(0.25, 0.75))
    spy = TextUNet()
    stats = LoopStats()
    out = denoise(LoopInputs(unet=spy, scheduler=IdentityScheduler(), latents=x, timesteps=[torch.tensor(1)],
                             conditioning=lambda i: cond, scales=[1.0]), stats)
    assert spy.calls[0]["rows"] == 2 and stats.evals_saved == 1
    torch.testing.assert_close(out, 0.5 * x + 10 * (0.25 * 1.0 + 0.75 * 3.0))


class ResidualControlNet:
    dtype = torch.float32

    def __init__(self):
        self.rows: list[int] = []

    def __call__(self, sample, t, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                 guess_mode=False, added_cond_kwargs=None, return_dict=False):
        assert controlnet_cond.shape[0] == sample.shape[0] == encoder_hidden_states.shape[0]
        self.rows.append(sample.shape[0])
        res = torch.full_like(sample, 0.1)
        return [res], res


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_gets_every_part_row(guess_mode):
    """ControlNet residuals per row: all rows, or (guess mode) the conditional rows with zeros for uncond."""
    x = torch.randn(1, 4, 8, 8)
    cond = Conditioning(cond=torch.ones(1, 3, 4), uncond=torch.zeros(1, 3, 4), extra=(torch.ones(1, 3, 4) * 2,),
                        weights=(1.0, 0.5))
    cn = ResidualControlNet()
    unet = TextUNet()
    denoise(LoopInputs(unet=unet, scheduler=IdentityScheduler(), latents=x, timesteps=[torch.tensor(1)],
                       conditioning=lambda i: cond, scales=[5.0],
                       control=[ControlInput(cn, torch.rand(1, 3, 64, 64), guess_mode=guess_mode)]))
    down = unet.calls[0]["down"][0]
    assert down.shape[0] == 3 and cn.rows == [2 if guess_mode else 3]
    assert torch.all(down[0] == 0) == guess_mode and torch.all(down[1:] == 0.1)


def test_sdxl_parts_get_their_own_pooled_embedding(manager, engine):
    sdxl = manager.get("tiny-sdxl")
    spy = TextUNet()
    spec = _spec(prompt="a red cat AND a blue dog :0.8", steps=2)
    run_stage(sdxl, spec, cache=engine.prompt_cache, unet=spy)
    from pipelines.prompts.encoding import PromptEncoder

    enc = PromptEncoder(sdxl.tokenizers, sdxl.text_encoders, pooled=True)
    pooled = [enc.encode(t).pooled for t in ("blur", "a red cat", " a blue dog")]
    added = spy.calls[0]["added"]
    assert added["text_embeds"].shape[0] == 3 and added["time_ids"].shape[0] == 3
    for row, expect in zip(added["text_embeds"], pooled):
        torch.testing.assert_close(row[None], expect)


def test_planner_counts_the_rows_of_and_parts():
    """Activations grow with the UNet rows: [uncond, 3 parts] is 4 rows per sample, not 2."""
    from pipelines.planner import ModelFootprint, PlanInput, TilingAsk, plan_generation
    from pipelines.request.schema import GenerationRequest
    from pipelines.request_plan import max_and_parts

    kw = dict(budget_bytes=None, family="sd1", model=ModelFootprint(weights=0),
              tiling=TilingAsk(force="off", vae_tiling="on"))
    plain, three = (plan_generation(PlanInput(1024, 1024, cond_rows=r, **kw)) for r in (2, 4))
    assert three.est_peak_bytes == 2 * plain.est_peak_bytes
    budget = dict(kw, budget_bytes=int(1.5e9), tiling=TilingAsk(force="on", vae_tiling="on", tile_size=64, overlap=16))
    four, two = (plan_generation(PlanInput(1024, 1024, cond_rows=r, **budget)) for r in (4, 2))
    assert four.tile_batch < two.tile_batch
    assert max_and_parts(GenerationRequest(prompt="a AND b AND c")) == 3
    assert max_and_parts(GenerationRequest(prompt="a")) == 1
