"""UNet2DConditionModel's forward in pieces, with the model's own submodules (for DeepCache feature caching).

The down path is a flat list of ops, each yielding one skip feature: conv_in, then every resnet(+attention) and
downsampler in order. The up path is the flat list of up resnets(+attention), each consuming one skip feature
from the end, an up-block's upsampler running after its last resnet. Branch `k` is DeepCache's `cache_branch_id`
k (Ma et al. 2024, section 3.2; DeepCache 0.1.1's helper), bit for bit: block b = k // 3, layer l = k % 3; a
shallow pass runs conv_in, the down ops of down blocks 0..b-1 and the first l of down block b, and the up ops of
the last b up blocks and the last l+1 of the up block before them, on the cached hidden state entering those up
ops (a full pass runs everything and returns that state). Branch 0 is DeepCache's default: conv_in and the last
up resnet+attention only; the last branch caches the mid block alone (SD 1.x/2.x: 0..11, SDXL: 0..8).
Before metadata version tessera-0.2 branch k meant this k+1 (`pipelines.metadata` reads old infotexts so).

`full` equals `unet(...)` bit for bit (tested on SD1- and SDXL-shaped UNets, with and without ControlNet
residuals). Supported blocks: diffusers' (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D / UNetMidBlock2D(CrossAttn),
i.e. SD 1.x, SD 2.x and SDXL; FreeU, T2I-Adapter residuals and Kandinsky-style hints are not supported.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class _Op:
    """One resnet (+ attention), or one downsampler (resnet None); `up` set on an up-block's last resnet."""

    resnet: Any = None
    attn: Any = None
    down: Any = None
    up: Any = None
    final: bool = False  # in the last up-block (never forwards upsample_size)


def _down_ops(unet) -> list[_Op]:
    ops: list[_Op] = []
    for block in unet.down_blocks:
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        ops += [_Op(resnet=r, attn=a) for r, a in zip(block.resnets, attns, strict=True)]
        if block.downsamplers is not None:
            ops.append(_Op(down=block.downsamplers))
    return ops


def _up_ops(unet) -> list[_Op]:
    ops: list[_Op] = []
    for i, block in enumerate(unet.up_blocks):
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        n = len(block.resnets)
        final = i == len(unet.up_blocks) - 1
        for j, (r, a) in enumerate(zip(block.resnets, attns, strict=True)):
            ops.append(_Op(resnet=r, attn=a, up=block.upsamplers if j == n - 1 else None, final=final))
    return ops


def unsupported_reason(unet) -> str | None:
    """Why this UNet cannot be split (None when it can)."""
    unet = getattr(unet, "_orig_mod", unet)
    if type(unet).__name__ != "UNet2DConditionModel":
        return f"{type(unet).__name__} is not a UNet2DConditionModel"
    blocks = [*unet.down_blocks, *unet.up_blocks]
    names = {type(b).__name__ for b in blocks}
    if not names <= set(_DOWN + _UP):
        return f"block types {sorted(names - set(_DOWN + _UP))} are not supported"
    if any(getattr(b, "s1", None) for b in unet.up_blocks):
        return "FreeU is enabled"
    if unet.config.addition_embed_type == "image_hint" or unet.config.class_embed_type is not None:
        return "class or hint embeddings are not supported"
    return None


def _counts(unet) -> tuple[list[int], list[int]]:
    """Ops per down block (resnets + downsampler), resnets per up block counted from the last (DeepCache's order)."""
    down = [len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks]
    return down, [len(b.resnets) for b in reversed(unet.up_blocks)]


def branch_count(unet) -> int:
    """How many branches the UNet has (valid branches are 0 .. count-1): DeepCache's ids up to the one whose
    shallow pass runs everything but the mid block (block = last down block, layer = its op count, at most 2)."""
    down, _ = _counts(getattr(unet, "_orig_mod", unet))
    return 3 * (len(down) - 1) + min(down[-1], 2) + 1


def branch_extent(unet, branch: int) -> tuple[int, int]:
    """(down ops, up ops) a shallow pass at DeepCache's `cache_branch_id` `branch` runs (conv_in not counted)."""
    down, up = _counts(getattr(unet, "_orig_mod", unet))
    block, layer = divmod(branch, 3)
    if block >= len(down):
        return sum(down), sum(up)
    return sum(down[:block]) + min(layer, down[block]), sum(up[:block]) + min(layer + 1, up[block])


class SplitUNet:
    """Full and shallow passes of one UNet2DConditionModel at one branch (see the module docstring)."""

    def __init__(self, unet, branch: int = 0):
        self.unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: its modules, run eagerly
        reason = unsupported_reason(self.unet)
        if reason:
            raise ValueError(f"feature caching cannot split this UNet: {reason}")
        self.down, self.ups = _down_ops(self.unet), _up_ops(self.unet)
        count = branch_count(self.unet)
        if not 0 <= branch < count:
            raise ValueError(f"branch must be in 0..{count - 1}, got {branch}")
        self.branch = branch
        self.n_down, self.n_up = branch_extent(self.unet, branch)
        self.enter = len(self.ups) - self.n_up  # index of the first up op of the shallow path

    def _embed(self, sample, timestep, enc, added):
        """Time (+ SDXL add) embedding and encoder states, exactly as UNet2DConditionModel.forward does."""
        u = self.unet
        if u.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=enc, added_cond_kwargs=added or {})
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        enc = u.process_encoder_hidden_states(encoder_hidden_states=enc, added_cond_kwargs=added or {})
        return sample, emb, enc

    @staticmethod
    def _resnet_attn(op: _Op, h, emb, enc):
        h = op.resnet(h, emb)
        if op.attn is not None:
            h = op.attn(h, encoder_hidden_states=enc, cross_attention_kwargs=None, attention_mask=None,
                        encoder_attention_mask=None, return_dict=False)[0]
        return h

    def _down_path(self, sample, emb, enc, n_ops: int, residuals):
        h = self.unet.conv_in(sample)
        skips = [h]
        for op in self.down[:n_ops]:
            if op.down is not None:
                for ds in op.down:
                    h = ds(h)
            else:
                h = self._resnet_attn(op, h, emb, enc)
            skips.append(h)
        if residuals is not None:
            skips = [s + r for s, r in zip(skips, residuals, strict=False)]
        return h, skips

    def _up_path(self, h, skips, emb, enc, start: int, forward_size: bool):
        cached = None
        for j in range(start, len(self.ups)):
            op = self.ups[j]
            if j == self.enter:
                cached = h
            h = self._resnet_attn(op, torch.cat([h, skips.pop()], dim=1), emb, enc)
            if op.up is not None:
                size = skips[-1].shape[2:] if (forward_size and not op.final) else None
                for us in op.up:
                    h = us(h, size)
        return h, cached

    def _out(self, h):
        u = self.unet
        if u.conv_norm_out:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)

    def _forward_size(self, sample) -> bool:
        factor = 2 ** self.unet.num_upsamplers
        return any(d % factor for d in sample.shape[-2:])

    def full(self, sample, timestep, enc, added=None, down_residuals=None, mid_residual=None):
        """(output, the feature entering the shallow path's first up op): the whole UNet."""
        x, emb, enc = self._embed(sample, timestep, enc, added)
        h, skips = self._down_path(x, emb, enc, len(self.down), down_residuals)
        u = self.unet
        if u.mid_block is not None:
            if getattr(u.mid_block, "has_cross_attention", False):
                h = u.mid_block(h, emb, encoder_hidden_states=enc, attention_mask=None, cross_attention_kwargs=None,
                                encoder_attention_mask=None)
            else:
                h = u.mid_block(h, emb)
        if mid_residual is not None:
            h = h + mid_residual
        h, cached = self._up_path(h, skips, emb, enc, 0, self._forward_size(sample))
        return self._out(h), cached

    def shallow(self, sample, timestep, enc, cached, added=None, down_residuals=None):
        """The output from conv_in, the branch's first down ops, the cached feature and its last up ops."""
        x, emb, enc = self._embed(sample, timestep, enc, added)
        _, skips = self._down_path(x, emb, enc, self.n_down, down_residuals)
        # the up ops run consume the first n_up skips (a block's extra downsampler output, as in DeepCache when
        # layers_per_block is 1, is computed and unused)
        h, _ = self._up_path(cached, skips[:self.n_up], emb, enc, self.enter, self._forward_size(sample))
        return self._out(h)


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_for(unet, branch: int) -> SplitUNet:
    """One SplitUNet per (UNet, branch), reused by every run. When the app compiled its UNet (`--compile`), the
    two passes are compiled the same way (reusing one object keeps torch.compile's guards, so no recompiles)."""
    per_branch = _SPLITS.setdefault(unet, {})
    if branch not in per_branch:
        split = SplitUNet(unet, branch)
        if split.unet is not unet:
            # instance attributes over the methods: the compiled passes (hence the ignores)
            split.full = torch.compile(split.full, dynamic=False)  # type: ignore[method-assign]
            split.shallow = torch.compile(split.shallow, dynamic=False)  # type: ignore[method-assign]
        per_branch[branch] = split
    return per_branch[branch]


def shallow_fraction(unet, branch: int, sample_shape: tuple[int, ...], enc_shape: tuple[int, ...],
                     added: dict | None = None) -> float:
    """FLOPs of a shallow pass / FLOPs of a full pass, counted with torch.utils.flop_counter.

    Counted on a meta-device twin built from the UNet's config (no weights, no compute): there SDPA runs as counted
    matmuls, while torch's counter has no formula for the CPU flash-attention kernel and would miss attention."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(getattr(unet, "_orig_mod", unet).config)
    split = SplitUNet(twin, branch)
    x, enc = torch.zeros(sample_shape, device="meta"), torch.zeros(enc_shape, device="meta")
    added = None if added is None else {k: torch.zeros(v.shape, device="meta") for k, v in added.items()}
    t = torch.tensor(500.0, device="meta")
    with torch.no_grad():
        with FlopCounterMode(display=False) as full_count:
            _, cached = split.full(x, t, enc, added)
        with FlopCounterMode(display=False) as shallow_count:
            split.shallow(x, t, enc, cached, added)
    return shallow_count.get_total_flops() / max(1, full_count.get_total_flops())
