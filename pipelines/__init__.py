"""Tessera's engine: everything that touches weights and tensors (no Gradio here).

Layout (docs/ARCHITECTURE.md has the whole map):

- top level: `request` (what a job asks for), `errors`, `metadata`, `presets`, `planner` (+ `request_plan`), `engine`
  (+ `job`, `outputs`, `stage_cache`, `process`), `factory` (ModelManager + Engine for app.py and cli.py);
- `hires/`: the two-stage flow (draft -> upscale -> refine) and the refine's settings;
- `vae/`: encode/decode, the exact tiled VAE and its streamed stages;
- `prompts/`: the A1111 prompt parser, encoding, AND, embeddings;
- `control/`: control images, preprocessors, ControlNet models, per-job units;
- `models/`: the model manager (the one owner of weights), tiny test models, upscalers, size estimates;
- `denoise/`: the denoising loop, guidance, schedulers, regions, feature caching;
- `edit/`: inpainting and outpainting;
- `serving/`: the backend interface, the worker pool, multi-device tiles and the Ray Serve cluster.
"""
