"""Two-stage generation ("hires fix"): draft latents -> upscale (latent or pixel) -> img2img refine on the same
weights.

- `refine`: the refine's strength, its input (`upscale_latents_or_pixels`) and its StageSpec (`refine_spec`);
- `flow`: a whole txt2img/img2img run on the engine: the draft (cached by `pipelines.stage_cache`), then, with
  hires on, the upscale, the tile ControlNet and the refine; the outputs (`pipelines.outputs`) at the end.
"""
