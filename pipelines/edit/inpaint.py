"""Inpainting and outpainting: masks, their geometry, and the loop's hooks (no engine, no UI).

Two methods, chosen by the model's UNet (`is_inpainting_unet`):
- a standard 4-channel UNet gets the blended-latent method of diffusers' StableDiffusionInpaintPipeline and
  A1111: after every scheduler step the latents outside the mask are replaced by the original latents noised to
  the next timestep (`LatentMask.post_step`);
- a 9-channel inpainting UNet (sd-v1-5-inpainting, the SDXL inpainting model) gets [latents, mask, masked-image
  latents] concatenated along the channels, in diffusers' order (`LatentMask.extra_channels`).

Soft inpainting (Differential Diffusion, Levin & Fried 2023): a grey level s in the mask is the pixel's change
strength; the pixel is held at the noised original until the step at which the run's progress passes 1 - s. A hard
mask (s in {0, 1}) is the special case of the same rule, so white = plain inpainting and black = unchanged.

Tiled runs skip the tiles with no masked latent pixel (`LatentMask.tile_filter`): their pixels are replaced by the
noised original after each step anyway, so the masked pixels get exactly the same values.

Pixel conventions: masks are PIL "L" images, 255 = repaint. The final image is the original outside the blurred
mask, pixel for pixel, and a feathered blend inside (`composite`), so the VAE round trip never touches the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter, ImageOps

from pipelines.errors import ValidationError
from pipelines.tiling import Tile

OUTPAINT_OVERLAP = 32
"""Pixels of the old image next to an outpainted side that are repainted in latent space (the model sees the seam
and continues the image across it); the paste-back still keeps every old pixel."""
OUTPAINT_NOISE = 0.15
"""Std of the Gaussian noise (in [-1, 1] units) added to the edge-extended pre-fill of new outpaint areas."""


# ---------------------------------------------------------------- loading and checks

def load_mask(value: Any, name: str = "mask") -> Image.Image:
    """An uploaded mask (path, bytes, PIL image, array) -> a checked greyscale "L" image; errors name `name`.

    The header checks (format, 64 MP) of `load_control_image` run before any pixel is decoded.
    """
    from pipelines.control.images import load_control_image

    try:
        return load_control_image(value).convert("L")  # grey -> RGB -> grey keeps every level
    except ValidationError as exc:
        raise ValidationError(name, exc.value, exc.fix) from None


def editor_images(value: Any, name: str = "inpaint_editor") -> tuple[Image.Image | None, Image.Image | None]:
    """The UI brush's value {"background": file, "layers": [files], ...} -> (image, mask): the background as a
    checked RGB image, the union of the painted layers' alpha as the mask (None when nothing is painted)."""
    if not isinstance(value, dict) or value.get("background") is None:
        return None, None
    image = _background(value["background"], name)
    mask = None
    for layer in value.get("layers") or []:
        alpha = _layer_alpha(layer, name)
        if alpha.size != image.size:
            alpha = alpha.resize(image.size, Image.Resampling.NEAREST)
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if mask is not None and mask.getextrema()[1] == 0:
        mask = None
    return image, mask


def _background(value: Any, name: str) -> Image.Image:
    from pipelines.control.images import load_control_image

    try:
        return load_control_image(value)
    except ValidationError as exc:
        raise ValidationError(name, exc.value, exc.fix) from None


def _layer_alpha(path: Any, name: str) -> Image.Image:
    """A painted layer's alpha channel, with the header checks of uploads (format, 64 MP) before decoding."""
    from pipelines.control.images import CONTROL_FORMATS, MAX_CONTROL_PIXELS

    fix = f"layers must be PNG/JPEG/WebP images of at most {MAX_CONTROL_PIXELS // 2**20} MP"
    try:
        with Image.open(path) as im:
            if im.format not in CONTROL_FORMATS or im.width * im.height > MAX_CONTROL_PIXELS:
                raise ValidationError(name, f"{im.format} {im.width}x{im.height}", fix)
            im.load()
            return im.getchannel("A") if "A" in im.getbands() else im.convert("L")
    except ValidationError:
        raise
    except Exception:  # PIL raises OSError, SyntaxError, ... for bad data
        raise ValidationError(name, "layer", fix) from None


def check_mask(mask: Image.Image, image: Image.Image | None, soft: bool) -> None:
    """A mask must come with an image, have its size, and repaint something (refused otherwise, never rescaled)."""
    if image is None:
        raise ValidationError("init_image", None, "is required with a mask: upload the image to inpaint")
    if not isinstance(mask, Image.Image):
        raise ValidationError("mask", type(mask).__name__, "must be an image (PNG, JPEG or WebP; white = repaint)")
    if mask.size != image.size:
        raise ValidationError("mask", f"{mask.width}x{mask.height}",
                              f"must have the image's size {image.width}x{image.height}; resize or redraw it")
    lo, hi = cast("tuple[int, int]", mask.convert("L").getextrema())  # one band: (min, max)
    if hi < (1 if soft else 128):
        raise ValidationError("mask", "empty", "is all black, so nothing would be repainted; paint (white) the "
                                               "area to repaint")


# ---------------------------------------------------------------- pixel-space preparation

def prepare_mask(mask: Image.Image, *, blur: int, invert: bool, soft: bool) -> Image.Image:
    """A1111's order: invert ("inpaint not masked"), binarise unless soft, then Gaussian blur (radius px)."""
    m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    if not soft:
        m = m.point(lambda v: 255 if v >= 128 else 0)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return m


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masked content "fill" (modules/masking.py fill): the masked area painted with ever finer blurs of
    the unmasked surroundings."""
    image_mod = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def outpaint(image: Image.Image, mask: Image.Image | None, sides: Sequence[int], seed: int
             ) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Extend the canvas by (left, right, top, bottom) px: (pre-filled image, repaint mask, paste-back limit).

    New pixels are the edge-extended image plus seeded Gaussian noise. The repaint mask covers the new area and
    `OUTPAINT_OVERLAP` px into the old image (and the user's own mask, if any); the limit is 0 over the old image
    outside the user's mask, so the paste-back keeps every old pixel.
    """
    left, right, top, bottom = (int(s) for s in sides)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    padded = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    h, w = padded.shape[:2]
    new = np.ones((h, w), dtype=bool)
    new[top:top + arr.shape[0], left:left + arr.shape[1]] = False
    noise = np.random.default_rng(seed).standard_normal(padded.shape).astype(np.float32) * OUTPAINT_NOISE * 127.5
    padded = np.where(new[..., None], np.clip(padded + noise, 0, 255), padded)
    user = np.zeros((h, w), dtype=bool)
    if mask is not None:
        user[top:top + arr.shape[0], left:left + arr.shape[1]] = np.asarray(mask.convert("L")) >= 128
    grown = _grow(new, OUTPAINT_OVERLAP, (left, right, top, bottom)) | user
    limit = new | user
    to_img = Image.fromarray
    return (to_img(padded.round().astype(np.uint8)), to_img((grown * 255).astype(np.uint8)),
            to_img((limit * 255).astype(np.uint8)))


def _grow(new: np.ndarray, px: int, sides: Sequence[int]) -> np.ndarray:
    """`new` widened by `px` into the old image on each extended side."""
    left, right, top, bottom = sides
    out = new.copy()
    h, w = new.shape
    if left:
        out[:, left:left + px] = True
    if right:
        out[:, max(w - right - px, 0):w - right] = True
    if top:
        out[top:top + px, :] = True
    if bottom:
        out[max(h - bottom - px, 0):h - bottom, :] = True
    return out


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's apply_overlay: original * (1 - m) + generated * m with the blurred mask m; exact where m == 0."""
    o = np.asarray(original.convert("RGB"), dtype=np.float32)
    g = np.asarray(generated.convert("RGB").resize(original.size, Image.Resampling.LANCZOS), dtype=np.float32)
    m = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    out = np.where(m > 0, np.clip(o + (g - o) * m, 0, 255).round(), o)
    return Image.fromarray(out.astype(np.uint8))


# ---------------------------------------------------------------- only masked: A1111's crop geometry

def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """A1111's get_crop_region: the box (x1, y1, x2, y2) around the mask's nonzero pixels plus `pad`, clamped;
    None for an empty mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(box: tuple[int, int, int, int], proc_w: int, proc_h: int, image_w: int, image_h: int
                       ) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: grow the box to the processing aspect ratio, moved (then clamped) inside."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > proc_w / proc_h:
        y1, y2 = _grow_span(y1, y2, (x2 - x1) * proc_h / proc_w, image_h)
    else:
        x1, x2 = _grow_span(x1, x2, (y2 - y1) * proc_w / proc_h, image_w)
    return x1, y1, x2, y2


def _grow_span(a: int, b: int, desired: float, size: int) -> tuple[int, int]:
    diff = int(desired - (b - a))
    a -= diff // 2
    b += diff - diff // 2
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def processing_size(box: tuple[int, int, int, int], long_side: int) -> tuple[int, int]:
    """(width, height) for a crop box: its aspect, the long side `long_side`, both multiples of 8 (>= 64)."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    scale = long_side / max(bw, bh)
    return max(64, int(round(bw * scale / 8)) * 8), max(64, int(round(bh * scale / 8)) * 8)


# ---------------------------------------------------------------- latent space: the loop's hooks

def is_inpainting_unet(unet: Any) -> bool:
    """A UNet that takes [latents, mask, masked-image latents]: 4 + 1 + 4 = 9 input channels."""
    config = getattr(unet, "config", None)
    return getattr(config, "in_channels", 4) == 9


def latent_mask(mask: Image.Image, scale: int = 8, soft: bool = False) -> torch.Tensor:
    """The pixel mask (blurred, 255 = repaint) at latent resolution [1, 1, h, w]: a latent pixel gets the largest
    value of its scale x scale block, so thin strokes are kept; hard masks are binarised at 0.5 first."""
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if not soft:
        m = (m >= 0.5).float()
    return F.max_pool2d(m, kernel_size=scale, stride=scale)


@dataclass
class LatentMask:
    """The mask of one stage in latent space and what the loop needs from it.

    `strength` is [1, 1, h, w] in [0, 1] (1 = repaint); `masked_latents` ([1, 4, h, w], the latents of the image
    with the masked pixels set to 0) is given for 9-channel UNets only; `content` is A1111's masked content.
    """

    strength: torch.Tensor
    masked_latents: torch.Tensor | None = None
    content: str = "original"
    soft: bool = False
    skip_tiles: bool = True
    seeds: Sequence[int] = ()
    _covered: torch.Tensor | None = field(default=None, repr=False)

    @property
    def nine_channel(self) -> bool:
        return self.masked_latents is not None

    def start_latents(self, init: torch.Tensor) -> torch.Tensor:
        """A1111's masked content in latent space: "latent noise" puts fresh noise, "latent nothing" zeros under
        the mask (before the first noising); "original" and "fill" (done in pixels) keep the latents."""
        if self.content not in ("latent noise", "latent nothing"):
            return init
        m = (self.strength > 0).to(init.device, init.dtype)
        if self.content == "latent nothing":
            return init * (1 - m)
        gens = [torch.Generator("cpu").manual_seed((int(s) + 0x5EED) % 2**32) for s in self.seeds or [0]]
        fresh = torch.cat([torch.randn((1, *init.shape[1:]), generator=g) for g in gens]).to(init.device, init.dtype)
        return init * (1 - m) + fresh.expand_as(init) * m

    def hooks(self, scheduler: Any, timesteps: Sequence[Any], init: torch.Tensor, noise: torch.Tensor
              ) -> dict[str, Any]:
        """LoopInputs keyword arguments: post_step, extra_channels, tile_filter."""
        strength = self.strength.to(init.device, init.dtype)
        steps = len(timesteps)

        def post_step(i: int, latents: torch.Tensor) -> torch.Tensor:
            nxt = i + 1
            if nxt < steps:
                t = torch.as_tensor(timesteps[nxt], device=init.device).reshape(1).repeat(init.shape[0])
                proper = scheduler.add_noise(init, noise, t)
            else:
                proper = init  # after the last step: the original latents themselves (diffusers)
            keep = frozen(strength, nxt, steps) if self.soft or not self.nine_channel else torch.zeros_like(
                strength, dtype=torch.bool)
            if self._covered is not None:
                keep = keep | ~self._covered.to(keep.device)
            return torch.where(keep, proper.to(latents.dtype), latents)

        out: dict[str, Any] = {"post_step": post_step}
        if self.masked_latents is not None:  # = self.nine_channel, narrowed for the type checker
            hard = (strength >= 0.5).to(init.dtype)
            out["extra_channels"] = torch.cat([hard.expand(self.masked_latents.shape[0], -1, -1, -1),
                                               self.masked_latents.to(init.device, init.dtype)], dim=1)
        if self.skip_tiles:
            out["tile_filter"] = self.tile_filter
        return out

    def tile_filter(self, tiles: list[Tile]) -> list[Tile]:
        """The tiles with a masked latent pixel; the pixels none of them covers are remembered for post_step."""
        active = self.strength[0, 0] > 0
        kept = [t for t in tiles if bool(active[t.y:t.y + t.h, t.x:t.x + t.w].any())]
        if len(kept) == len(tiles):
            self._covered = None
            return tiles
        covered = torch.zeros_like(active)
        for t in kept:
            covered[t.y:t.y + t.h, t.x:t.x + t.w] = True
        self._covered = covered[None, None]
        return kept


def frozen(strength: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """Differential Diffusion's per-step mask: True where a pixel of change strength s is still held at the noised
    original before step `step` of `steps` (s <= 1 - step/steps); s = 1 is never held, s = 0 always."""
    return strength <= 1.0 - step / steps
