"""Export a diffusers Stable Diffusion 1.x pipeline folder as an original-format ("LDM", CompVis/A1111) checkpoint.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint). The key tables here are their inverse, after the mapping
in diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (Apache-2.0), but derived from the
model configs so they also fit the tiny test models (any number of blocks, attention at some levels only).

Test helper only: SD 1.x layout (CLIP text encoder, cross-attention mid block, `layers_per_block` an int).
Every tensor must map; an unknown key raises instead of being dropped, so a silent partial export cannot happen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers resnet sub-module -> LDM ResBlock sub-module
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# diffusers VAE attention (Linear layers) -> LDM AttnBlock (1x1 convs)
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers_per_block(config: dict) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block must be an int for an SD 1.x export, got {lpb!r}")
    return lpb


def _rename(key: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Map `key` through the longest matching diffusers prefix; renames apply to the sub-module after it."""
    match = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
    if match is None:
        raise KeyError(f"no LDM name for diffusers key {key!r}")
    target, renames = prefixes[match]
    rest = key[len(match):]
    for old, new in renames.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return target + rest


def unet_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet2DConditionModel prefix -> (LDM UNetModel prefix, sub-module renames)."""
    lpb = _layers_per_block(config)
    n = len(config["block_out_channels"])
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET),
    }
    for b in range(n):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            m[f"down_blocks.{b}.resnets.{j}."] = (f"input_blocks.{i}.0.", _UNET_RESNET)
            m[f"down_blocks.{b}.attentions.{j}."] = (f"input_blocks.{i}.1.", {})
        if b < n - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.", {})
    for b, block_type in enumerate(config["up_block_types"]):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            m[f"up_blocks.{b}.resnets.{j}."] = (f"output_blocks.{i}.0.", _UNET_RESNET)
            m[f"up_blocks.{b}.attentions.{j}."] = (f"output_blocks.{i}.1.", {})
        if b < n - 1:  # the upsampler follows the last layer's resnet (and its attention, where there is one)
            slot = 2 if "CrossAttn" in block_type else 1
            m[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.", {})
    return m


def vae_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers AutoencoderKL prefix -> (LDM AutoencoderKL prefix, sub-module renames)."""
    lpb = _layers_per_block(config)
    n = len(config["block_out_channels"])
    m: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        m[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        m[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        m[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        m[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTN)
    for i in range(n):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        up = n - 1 - i  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        for j in range(lpb + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{up}.block.{j}.", _VAE_RESNET)
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{up}.upsample.conv.", {})
    return m


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(config)
    return {UNET_PREFIX + _rename(k, prefixes): v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = vae_prefixes(config)
    out = {}
    for k, v in state.items():
        new = _rename(k, prefixes)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # Linear (out, in) -> 1x1 conv (out, in, 1, 1), as in the original AttnBlock
        out[VAE_PREFIX + new] = v
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor], max_positions: int | None = None) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> `cond_stage_model.transformer.text_model.*` (transformers >= 5.6 drops `text_model.`).

    `max_positions` adds the `position_ids` buffer that real SD 1.x checkpoints carry (loaders must ignore it)."""
    out = {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}
    if max_positions:
        out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    sub = folder / name
    files = sorted(sub.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .safetensors weights file in {sub}, found {len(files)}")
    return load_file(str(files[0])), json.loads((sub / "config.json").read_text())


def ldm_state_dict(pipe_folder: Path | str, *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The LDM-keyed state dict of the SD 1.x diffusers pipeline in `pipe_folder` (unet, vae, text_encoder)."""
    folder = Path(pipe_folder)
    unet, unet_cfg = _component(folder, "unet")
    vae, vae_cfg = _component(folder, "vae")
    clip, clip_cfg = _component(folder, "text_encoder")
    state = unet_to_ldm(unet, unet_cfg)
    state.update(vae_to_ldm(vae, vae_cfg))
    state.update(text_encoder_to_ldm(clip, clip_cfg["max_position_embeddings"] if position_ids else None))
    expected = len(unet) + len(vae) + len(clip) + int(position_ids)
    if len(state) != expected:  # two diffusers keys mapped onto one LDM key
        raise ValueError(f"LDM export collided: {expected} tensors became {len(state)} keys")
    return state


def export_ldm_checkpoint(pipe_folder: Path | str, out_path: Path | str, *, position_ids: bool = True) -> Path:
    """Write the SD 1.x pipeline in `pipe_folder` as one original-format `.safetensors` checkpoint at `out_path`."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in ldm_state_dict(pipe_folder, position_ids=position_ids).items()}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out
