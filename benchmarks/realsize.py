"""Real-size SD 1.5 and SDXL architectures with random weights, for speed and memory benchmarks without downloads.

Speed and memory depend on the architecture and the tensor shapes, not on the weights, so a random-weight model
built from the real configs (written out below) measures what the real one would. The folders are written once
with `save_pretrained` (fp16 weights, about 2 GB for SD 1.5 and 7 GB for SDXL) and loaded back through the app's
`ModelManager` like any local diffusers folder. The text encoders keep their real sizes but use the tiny
character-level tokenizer (`pipelines.models.tiny._write_tokenizer`), so no vocabulary file is needed. A random-weight
TAESD (the real TAESD architecture: `AutoencoderTiny()` defaults) is written next to them as `taesd`/`taesdxl`,
where `ModelManager` looks for one, and a random tile ControlNet (`ControlNetModel.from_unet`) as
`controlnet/<name>-tile`, which the engine's two-stage refine picks up (presets/ultra.json uses one).

Layout: `<models_dir>/<name>/` is the diffusers folder, `<models_dir>` is the ModelManager's models folder, so the
model loads by its plain name.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines.models.tiny import _scheduler, _write_tokenizer, save_taesd

log = logging.getLogger(__name__)

REAL_MODELS = ("sd15-random", "sdxl-random")
VERSION = "1"  # bump when a config below changes
SEED = 4321

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")


def _text_encoder(config: dict, eos: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                         pad_token_id=eos, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def build_real(name: str, folder: Path) -> Path:
    """Write the random-weight model `name` (sd15-random | sdxl-random) as a diffusers folder with fp16 weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if name not in REAL_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {REAL_MODELS}")
    sdxl = name == "sdxl-random"
    log.info("building %s (random weights, real architecture) in %s; this takes a minute", name, folder)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tok")
    eos = tokenizer.eos_token_id
    unet = UNet2DConditionModel(**(SDXL_UNET if sdxl else SD15_UNET)).eval()
    vae = AutoencoderKL(**VAE, sample_size=1024 if sdxl else 512, scaling_factor=0.13025 if sdxl else 0.18215,
                        force_upcast=sdxl).eval()
    te1 = _text_encoder(CLIP_L, eos, projection=False)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=_text_encoder(CLIP_BIG_G, eos, projection=True),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler(), add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te1, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.float16)
    _publish(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return folder


def build_tile_controlnet(unet_folder: Path, folder: Path) -> Path:
    """A random-weight ControlNet of the real size for `unet_folder`'s UNet (zero output convs, as trained ones
    start): it costs what a real tile ControlNet costs per step."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder / "unet")
    cn = ControlNetModel.from_unet(unet).to(torch.float16)
    del unet
    _publish(folder, lambda tmp: cn.save_pretrained(tmp, safe_serialization=True))
    return folder


def _publish(folder: Path, write) -> None:
    """Write into `<folder>.partial`, stamp it, then rename: a half-written folder is never loaded."""
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    write(partial)
    (partial / "BENCH_VERSION").write_text(VERSION)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)


def _built(folder: Path) -> bool:
    stamp = folder / "BENCH_VERSION"
    return stamp.exists() and stamp.read_text() == VERSION


def build_taesd(folder: Path) -> Path:
    """A random-weight TAESD with the real architecture (AutoencoderTiny defaults)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(SEED + 1)
    tae = AutoencoderTiny().eval().to(torch.float16)
    _publish(folder, lambda tmp: save_taesd(tae, tmp))
    return folder


def ensure_real(name: str, models_dir: Path) -> Path:
    """Random model `name` as `models_dir/name` (built once), with its TAESD and tile ControlNet beside it."""
    folder = models_dir / name
    models_dir.mkdir(parents=True, exist_ok=True)
    if not _built(folder):
        build_real(name, folder)
    ensure_taesd(models_dir, sdxl=name == "sdxl-random")
    tile = models_dir / "controlnet" / f"{name}-tile"
    if not _built(tile):
        tile.parent.mkdir(parents=True, exist_ok=True)
        build_tile_controlnet(folder, tile)
    return folder


def ensure_taesd(models_dir: Path, *, sdxl: bool) -> Path:
    """models_dir/taesd (or taesdxl), where `ModelManager` looks for a local TAESD; random weights."""
    folder = models_dir / ("taesdxl" if sdxl else "taesd")
    if not _built(folder):
        models_dir.mkdir(parents=True, exist_ok=True)
        build_taesd(folder)
    return folder
