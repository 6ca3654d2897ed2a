"""Tiny offline model family: SD 1.x- and SDXL-shaped pipelines with fixed-seed random weights.

They are written with ``save_pretrained`` as ordinary diffusers folders and then loaded back through
``pipelines.models.manager`` like any real model, so the loader is exercised too. They make noise-like images:
good for shapes, determinism, metadata, seams and equivalences, never for beauty. A folder is a few
hundred KB and builds in about a second.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
from typing import Any
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-inpaint", "tiny-sdxl-inpaint")
# Inpainting variants: a UNet with 9 input channels (latents, mask, masked-image latents), like sd-v1-5-inpainting
INPAINT_MODELS = ("tiny-inpaint", "tiny-sdxl-inpaint")
TINY_VERSION = "4"  # bump when a config below changes, so cached folders are rebuilt
SEED = 1234


def default_cache_dir() -> Path:
    """Where tiny models are written; `TESSERA_CACHE` overrides the default `~/.cache/tessera`."""
    root = os.environ.get("TESSERA_CACHE") or Path.home() / ".cache" / "tessera"
    return Path(root) / "tiny"


def _write_tokenizer(folder: Path) -> None:
    """A character-level CLIP tokenizer: one token per character (+ end-of-word form), empty merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(folder)


def _text_encoder(vocab_size: int, eos: int, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=eos - 1,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae():
    from diffusers.models import AutoencoderKL  # not `diffusers`: a type checker sees its torch-less placeholders there

    # Four blocks = three downsamples = the real 8x latent scale of Stable Diffusion.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def _taesd():
    from diffusers.models import AutoencoderTiny  # not `diffusers`: a type checker sees its torch-less placeholders there

    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def save_taesd(tae, folder: Path) -> None:
    """`save_pretrained` without the `block_out_channels` key AutoencoderTiny adds to its own config, which its
    loader then rejects with a warning on every load ("config attributes ... are not expected")."""
    tae.save_pretrained(folder, safe_serialization=True)
    config = Path(folder) / "config.json"
    data = json.loads(config.read_text())
    data.pop("block_out_channels", None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def _unet(sdxl: bool, in_channels: int = 4):
    from diffusers.models import UNet2DConditionModel  # not `diffusers`: a type checker sees its torch-less placeholders there

    common = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    if not sdxl:
        # Attention only at the downsampled level keeps tiled 2048-4096 px runs on a CPU in seconds.
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            **common,
        ).eval()
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # concat of the two 32-wide text encoders
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text
        **common,
    ).eval()


def build_tiny(name: str, folder: Path) -> Path:
    """Build the tiny model `name` (one of TINY_MODELS) into `folder` as a diffusers pipeline folder."""
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tok")
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    sdxl, inpaint = name.startswith("tiny-sdxl"), name in INPAINT_MODELS
    unet, vae = _unet(sdxl, 9 if inpaint else 4), _vae()
    cls: type
    pipe: Any  # one of four pipeline classes (diffusers' top-level names: placeholders to a type checker)
    te1 = _text_encoder(vocab, eos, 32, projection=False)
    if sdxl:
        te2 = _text_encoder(vocab, eos, 32, projection=True)
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
        pipe = cls(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,  # like SDXL base
        )
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
        pipe = cls(
            vae=vae, text_encoder=te1, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    tmp_out = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    pipe.save_pretrained(tmp_out, safe_serialization=True)
    save_taesd(_taesd(), tmp_out / "taesd")
    (tmp_out / "TINY_VERSION").write_text(TINY_VERSION)
    _publish(tmp_out, folder)
    log.info("built tiny model %s in %s", name, folder)
    return folder


def _publish(built: Path, folder: Path) -> None:
    """Move a finished build into place atomically; an up-to-date folder that appeared meanwhile wins."""
    if folder.exists():
        if _current(folder):
            shutil.rmtree(built, ignore_errors=True)
            return
        stale = folder.with_name(f"{folder.name}.stale-{uuid.uuid4().hex[:8]}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        built.rename(folder)  # a half-written folder is never visible under the final name
    except OSError:  # another process published first
        shutil.rmtree(built, ignore_errors=True)


def _current(folder: Path) -> bool:
    stamp = folder / "TINY_VERSION"
    return stamp.exists() and stamp.read_text() == TINY_VERSION


_build_lock = threading.Lock()


def ensure_tiny(name: str, cache_dir: Path | None = None) -> Path:
    """Return the folder of tiny model `name`, building it once if missing or outdated (thread-safe)."""
    folder = (cache_dir or default_cache_dir()) / name
    if _current(folder):
        return folder
    with _build_lock:  # the UI's token counter and a generation may ask at the same moment
        if not _current(folder):
            folder.parent.mkdir(parents=True, exist_ok=True)
            build_tiny(name, folder)
    return folder


def build_tiny_controlnet(unet_folder: Path, folder: Path) -> Path:
    """A tiny ControlNet made from the tiny UNet (`ControlNetModel.from_unet`), saved to `folder`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet")
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    # from_unet zero-initialises the output convs; give them small random weights so a tiny ControlNet
    # actually changes the result (a trained one does, and tests must see the effect).
    with torch.no_grad():
        for mod in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            mod.weight.normal_(0, 0.05)
        _live_conditioning(cn.controlnet_cond_embedding)
    tmp_out = folder.with_name(f"{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    cn.save_pretrained(tmp_out, safe_serialization=True)
    (tmp_out / "TINY_VERSION").write_text(TINY_VERSION)
    _publish(tmp_out, folder)
    return folder


def _live_conditioning(embedding) -> None:
    """Make the control map count: from_unet zero-initialises the conditioning embedding's conv_out (the map's
    only way into the network), and its default-initialised convs shrink the map's signal ~1000x over six
    SiLU/stride layers. He-normal weights (conv_out x8, zero biases, fixed seed) give an embedding of about the
    strength of the sample's own conv_in features (mean |x| ~0.3 vs ~0.4)."""
    gen = torch.Generator().manual_seed(SEED + 2)
    for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
        std = math.sqrt(2.0 / conv.weight[0].numel()) * (8.0 if conv is embedding.conv_out else 1.0)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
        conv.bias.zero_()


def ensure_tiny_controlnet(base: str, cache_dir: Path | None = None) -> Path:
    """The folder of the tiny ControlNet for tiny model `base` (its own UNet's shape), built once if missing or
    outdated (TINY_VERSION), thread-safe."""
    root = cache_dir or default_cache_dir()
    folder = root / ("tiny-controlnet" if base == "tiny" else f"{base}-controlnet")
    if _current(folder):
        return folder
    unet_folder = ensure_tiny(base, cache_dir)
    with _build_lock:
        if not _current(folder):
            build_tiny_controlnet(unet_folder, folder)
    return folder
