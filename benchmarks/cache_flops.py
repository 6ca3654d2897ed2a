"""`python -m benchmarks.cache_flops`: FLOPs of a feature-cache shallow pass relative to a full pass, counted with
torch.utils.flop_counter on the real SD 1.5 and SDXL UNet configs (built on the meta device: no weights, no
compute, seconds on any machine), and the per-step FLOP ratio a schedule predicts. Writes
benchmarks/results/feature-cache-flops.md."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks.realsize import SD15_UNET, SDXL_UNET
from pipelines.denoise.feature_cache import full_steps
from pipelines.denoise.unet_split import shallow_fraction

RESULT = Path(__file__).resolve().parent / "results" / "feature-cache-flops.md"
CASES = (("SD 1.5", SD15_UNET, 256), ("SD 1.5", SD15_UNET, 512), ("SDXL", SDXL_UNET, 1024))


def _fraction(config: dict, px: int, branch: int) -> float:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    side, added = px // 8, None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.zeros(2, pooled, device="meta"), "time_ids": torch.zeros(2, 6, device="meta")}
    return shallow_fraction(unet, branch, (2, 4, side, side), (2, 77, config["cross_attention_dim"]), added)


def predicted_ratio(fraction: float, steps: int, interval: int) -> float:
    """UNet FLOPs per step with caching / without: (full steps + fraction x shallow steps) / steps."""
    n_full = len(full_steps(steps, interval))
    return (n_full + fraction * (steps - n_full)) / steps


def main() -> int:
    lines = ["| UNet | size | branch | shallow / full FLOPs | 6 steps, interval 3 | 25 steps, interval 3 |",
             "|---|---|---|---|---|---|"]
    for name, config, px in CASES:
        for branch in (0, 1, 2):
            f = _fraction(config, px, branch)
            r6, r25 = predicted_ratio(f, 6, 3), predicted_ratio(f, 25, 3)
            lines.append(f"| {name} | {px}² | {branch} | {f:.3f} | {r6:.3f} ({1 / r6:.2f}× fewer) | "
                         f"{r25:.3f} ({1 / r25:.2f}× fewer) |")
    text = ("Feature caching (DeepCache): counted UNet FLOPs (torch.utils.flop_counter, CFG batch of 2, meta device; "
            "device-independent)\n\n" + "\n".join(lines) + "\n")
    print(text)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
