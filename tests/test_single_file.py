"""Original-format ("LDM", CompVis/A1111) single-file SD 1.x checkpoints through the app's real loader, offline.

The tiny diffusers pipeline is exported to one LDM-keyed `.safetensors` file (tests/ldm_export.py) and dropped in a
models folder. Loaded by name through ModelManager/Engine (`StableDiffusionPipeline.from_single_file` with
`config=models/configs/sd1`), it must give back the very same weights and the very same image as the tiny folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines.engine import Engine
from pipelines.errors import OfflineError
from pipelines.families import sd1
from pipelines.models.loading import Source, family_of_file
from pipelines.models.manager import ModelManager
from tests.ldm_export import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, export_ldm_checkpoint, ldm_state_dict

FILE = "tiny-ldm.safetensors"
COMPONENTS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"}  # pipeline attribute -> tiny subfolder
REQ = dict(width=64, height=64, steps=2, seed=7, sampler="Euler")


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = (folder / component).glob("*.safetensors")
    return load_file(str(file))


def _config_only_copy(pipe_folder: Path, dest: Path) -> Path:
    """The tiny pipeline folder without any weights: configs, tokenizer, scheduler, model_index.json only.

    So every weight of the loaded model must have come from the single file."""
    shutil.copytree(pipe_folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "taesd", "TINY_VERSION"))
    assert not list(dest.rglob("*.safetensors"))
    return dest


@pytest.fixture
def ldm_models(tmp_path, tiny_dir) -> Path:
    """A models folder holding only the tiny pipeline exported as an LDM single file."""
    models = tmp_path / "models"
    export_ldm_checkpoint(tiny_dir, models / FILE)
    return models


def test_export_is_an_sd1_ldm_checkpoint_that_diffusers_converts_back_exactly(tiny_dir, ldm_models):
    """The exporter alone: LDM key layout, and diffusers' own LDM->diffusers converters invert it tensor for tensor."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    state = load_file(str(ldm_models / FILE))
    assert state.keys() == ldm_state_dict(tiny_dir).keys()
    for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX + "text_model."):
        assert any(k.startswith(prefix) for k in state), prefix
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX + "text_model.")) for k in state)
    assert "model.diffusion_model.input_blocks.0.0.weight" in state and "model.diffusion_model.out.2.weight" in state
    # SD1 VAE attention is stored as 1x1 convs in the original format
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert state["first_stage_model.encoder.mid.attn_1.proj_out.weight"].ndim == 4
    assert infer_diffusers_model_type(state) == "v1" and family_of_file(ldm_models / FILE) == "sd1"

    for component, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        config = json.loads((tiny_dir / component / "config.json").read_text())
        original, back = _weights(tiny_dir, component), convert(state, config)
        assert back.keys() == original.keys(), component
        assert all(torch.equal(back[k], original[k]) for k in original), component
    original = _weights(tiny_dir, "text_encoder")
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    assert back.keys() - original.keys() == {"embeddings.position_ids"}  # real SD 1.x files carry it too
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_ldm_single_file_loads_offline_with_local_configs_and_matches_the_tiny_folder(
        tiny_dir, ldm_models, req_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _config_only_copy(tiny_dir, ldm_models / "configs" / "sd1")
    manager = ModelManager(ldm_models, device="cpu", dtype="fp32")
    assert manager.local_models() == [FILE]  # configs/ is not offered as a model
    assert manager.resolve(FILE) == Source("file", str(ldm_models / FILE))

    reference = Engine(manager, None).generate(req_factory(model="tiny", **REQ), save=False)
    result = Engine(manager, None).generate(req_factory(model=FILE, **REQ), save=False)

    loaded = manager.current
    assert loaded is not None and loaded.name == FILE and loaded.source.kind == "file" and loaded.family == "sd1"
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
    # The round trip: every weight of the loaded pipeline equals the tiny folder's, none missing, none extra.
    for attr, sub in COMPONENTS.items():
        original = _weights(tiny_dir, sub)
        got = getattr(loaded.pipe, attr).state_dict()
        assert got.keys() == original.keys(), attr
        differ = [k for k in original if not torch.equal(got[k].cpu(), original[k])]
        assert not differ, f"{attr}: {len(differ)} tensors differ after the LDM round trip, e.g. {differ[:3]}"
    saved = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())  # configs/sd1 is a copy
    assert type(loaded.pipe.scheduler).__name__ == saved["_class_name"]
    saved = {k: v for k, v in saved.items() if not k.startswith("_")}
    assert {k: v for k, v in loaded.pipe.scheduler.config.items() if k in saved} == saved

    (ref_img,), (img,) = reference.images, result.images
    assert img.size == ref_img.size == (64, 64)
    a, b = np.asarray(ref_img, dtype=np.int16), np.asarray(img, dtype=np.int16)
    assert a.std() > 1, "the reference image is flat: the comparison would prove nothing"
    assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()} vs the tiny diffusers folder"


def test_ldm_single_file_without_configs_offline_is_a_clear_offline_error(ldm_models, req_factory, monkeypatch,
                                                                         tmp_path):
    import huggingface_hub.constants as hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # nothing cached for the hub id
    manager = ModelManager(ldm_models, device="cpu", dtype="fp32")
    engine = Engine(manager, None)

    with pytest.raises(OfflineError) as info:
        engine.generate(req_factory(model=FILE, **REQ), save=False)

    local_cfg = ldm_models / "configs" / "sd1"
    assert str(info.value) == (
        f"could not load {FILE}: its sd1 component configs come from {sd1.FAMILY.single_file_config} "
        f"(could not download, offline?). Put a diffusers config folder at {local_cfg}."
    )
    # the hub's own offline refusal (diffusers' config snapshot download) is chained for the log, not shown
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    assert manager.current is None


def test_a_broken_checkpoint_with_downloadable_configs_is_not_called_offline(tiny_dir, ldm_models, req_factory,
                                                                             monkeypatch):
    """Configs found (here: the catalogue entry pointed at a local copy), weights of the wrong shape: the error
    names the file's problem, not a download."""
    from pipelines.errors import ModelError

    monkeypatch.setattr(sd1.FAMILY, "single_file_config", str(_config_only_copy(tiny_dir, ldm_models.parent / "c")))
    state = load_file(str(ldm_models / FILE))
    key = "model.diffusion_model.out.2.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1, *state[key].shape[2:])
    from safetensors.torch import save_file

    save_file(state, str(ldm_models / FILE))
    with pytest.raises(ModelError) as info:
        Engine(ModelManager(ldm_models, device="cpu", dtype="fp32"), None).generate(
            req_factory(model=FILE, **REQ), save=False)
    assert not isinstance(info.value, OfflineError)
    assert str(info.value).startswith(f"could not load {FILE}: ") and "offline" not in str(info.value)


def test_token_counter_works_for_a_single_file_model_before_and_after_loading(tiny_dir, ldm_models, req_factory,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _config_only_copy(tiny_dir, ldm_models / "configs" / "sd1")
    manager = ModelManager(ldm_models, device="cpu", dtype="fp32")
    before = manager.tokenizer(FILE)  # from configs/sd1/tokenizer, no weights loaded
    assert before is not None and manager.current is None
    assert before("a lighthouse").input_ids == manager.tokenizer("tiny")("a lighthouse").input_ids
    engine = Engine(manager, None)
    engine.generate(req_factory(model=FILE, **REQ), save=False)
    engine.generate(req_factory(model="tiny", **REQ), save=False)  # switch away: the file model is unloaded
    assert manager.current.name == "tiny" and manager.tokenizer(FILE) is not None
    assert "tokens" in engine.count_tokens(FILE, "a lighthouse")
