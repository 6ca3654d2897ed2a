"""A run's outputs: decode each image, score the tile seams, write the A1111 infotext, save the PNG at once.

Each image is saved as soon as it is decoded, so a later crash keeps it; the images an attempt saved before it ran
out of memory are kept by the retry (`Saved`), never saved twice (README: "Reliability").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipelines.denoise.loop import LoopStats
from pipelines.images import to_pil
from pipelines.job import CodecOptions, Job
from pipelines.metadata import infotext
from pipelines.planner import Plan
from pipelines.request.hires import hires_denoise
from pipelines.request.schema import GenerationRequest
from pipelines.saving import save_png
from pipelines.tiling import plan_tiles, seam_score, tile_boundaries
from pipelines.vae import io as vae_io


@dataclass
class GenerationResult:
    """Finished images (already saved when `paths` is filled), their metadata and run statistics."""

    request: GenerationRequest
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[Path] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """What a run hands to the outputs: latents to decode or finished images, and how they were made."""

    job: Job
    plan: Plan
    """The last stage's plan (its tiles are the seams scored; its line goes into the metadata)."""
    codec: CodecOptions
    """The last stage's VAE settings, to decode with."""
    latents: torch.Tensor | None = None
    """[B, C, h, w] final latents; None when `images` are given."""
    images: Sequence[Image.Image] | None = None
    """Finished pixels (inpainting's paste-back, a hires upscale without refine)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Infotext keys of the whole run (textual inversions' hashes)."""
    warnings: Sequence[str] = ()
    """What the user should know about the run (a stage left out, a setting that had no effect)."""
    plan_note: str = ""
    """Appended to the last stage's plan line in the result's stats (inpainting: tiles skipped)."""
    size: tuple[int, int] | None = None
    """Only masked: the (width, height) the crop was processed at, A1111's `Size` there; None = the output size."""


@dataclass(frozen=True)
class Saved:
    """One image saved by an attempt at this run."""

    image: Image.Image
    infotext: str
    path: Path


def recorded(req: GenerationRequest, seed: int) -> GenerationRequest:
    """The request as written into an image's metadata: its own seed, the effective hires denoise, ControlNet
    units' settings without their images (the init image stays: whether there is one decides what A1111's
    `Denoising strength` records; no image is written)."""
    if req.hires.enabled and req.hires.denoise is None:
        req = replace(req, hires=replace(req.hires, denoise=hires_denoise(req)))
    control = tuple(replace(u, image=None) for u in req.control)
    return replace(req, seed=seed, control=control)


def image_seam_score(img: Image.Image, plan: Plan) -> float:
    """`pipelines.tiling.seam_score` of an image at the plan's UNet tile boundaries."""
    tiles = plan_tiles(img.height // 8, img.width // 8, plan.tile_size, plan.overlap)
    xs, ys = tile_boundaries(tiles, scale=8)
    return round(float(seam_score(img, xs, ys)), 4)


def image_notes(plan: Plan, stats: LoopStats, report: vae_io.DecodeReport, seams: float | None) -> dict[str, Any]:
    """The run's own infotext keys: tile plan, seam score, UNet passes saved, the decoder's notes."""
    extra: dict[str, Any] = {}
    if plan.tiled:
        extra["Tile plan"] = plan.describe()
    if seams is not None:
        extra["Seam score"] = seams
    if stats.evals_saved:
        extra["UNet evals saved"] = stats.evals_saved
    if report.notes:
        extra["VAE notes"] = "; ".join(report.notes)  # not "VAE": A1111 pastes that as the VAE file to load
    return extra


def run_stats(stats: LoopStats, report: vae_io.DecodeReport, seams: float | None) -> dict[str, Any]:
    """`GenerationResult.stats` from the loop's counters (the feature cache's only when it ran)."""
    out: dict[str, Any] = {"unet_evals": stats.unet_evals, "unet_calls": stats.unet_calls,
                           "evals_saved": stats.evals_saved, "tiles_per_step": stats.tiles_per_step,
                           "seam_score": seams, "notes": list(report.notes)}
    if stats.cache_full or stats.cache_shallow:  # feature caching: UNet calls run full / shallow
        out.update(unet_full_calls=stats.cache_full, unet_shallow_calls=stats.cache_shallow)
    return out


def _image(out: Outcome, i: int) -> Image.Image:
    """Image `i` of the run: given, or decoded now."""
    if out.images is not None:
        return out.images[i]
    job = out.job
    assert out.latents is not None  # an Outcome has images or latents
    decoded = out.codec.decode(job.model, out.latents[i:i + 1], mode=job.req.vae_decode, report=job.report)
    return to_pil(decoded)[0]


def finish(out: Outcome, saved: list[Saved], outputs_dir: Path | None) -> GenerationResult:
    """Decode, score, describe and (when the job saves and there is a folder) save each image in turn; `saved`
    holds the images an earlier attempt at this run saved (kept as they are) and gets each one saved here."""
    job = out.job
    req = job.req
    result = GenerationResult(request=req, images=[], seeds=job.seeds, infotexts=[])
    seams = None
    for i, seed in enumerate(job.seeds):
        if i < len(saved):  # finished and saved by an attempt that then ran out of memory: keep it
            result.images.append(saved[i].image)
            result.infotexts.append(saved[i].infotext)
            result.paths.append(saved[i].path)
            continue
        img = _image(out, i)
        if out.plan.tiled and seams is None and req.vae_decode == "full":
            seams = image_seam_score(img, out.plan)
        extra = {**image_notes(out.plan, job.stats, job.report, seams), **out.extra}
        text = infotext(recorded(req, seed), seed=seed, model_hash=job.model.short_hash, extra=extra, size=out.size)
        result.images.append(img)
        result.infotexts.append(text)
        if job.save and outputs_dir is not None:
            result.paths.append(save_png(img, text, outputs_dir, seed))  # saved now: a later crash keeps it
            saved.append(Saved(img, text, result.paths[-1]))
    result.stats.update(run_stats(job.stats, job.report, seams))
    return result
