"""LoRA loading by name:weight through the model manager (a tiny LoRA is trained-free: random B matrices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import ValidationError


def _save_tiny_lora(folder, name: str) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pipelines.models.tiny import ensure_tiny

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny("tiny") / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name=f"{name}.safetensors")


@pytest.fixture(scope="module")
def lora_manager(tiny_cache, tmp_path_factory):
    from pipelines.models.manager import ModelManager

    models = tmp_path_factory.mktemp("lora-models")
    (models / "lora").mkdir()
    _save_tiny_lora(models / "lora", "style")
    return ModelManager(models, device="cpu", dtype="fp32")


def test_lora_weight_changes_output_and_unloads(lora_manager, tmp_path, req_factory):
    from pipelines.engine import Engine

    engine = Engine(lora_manager, None)
    plain = np.asarray(engine.generate(req_factory(), save=False).images[0], dtype=np.int16)
    styled = np.asarray(engine.generate(req_factory(loras=("style:1.0",)), save=False).images[0], dtype=np.int16)
    half = np.asarray(engine.generate(req_factory(loras=("style:0.5",)), save=False).images[0], dtype=np.int16)
    assert np.abs(plain - styled).mean() > 0.5
    assert 0 < np.abs(plain - half).mean() < np.abs(plain - styled).mean()
    again = np.asarray(engine.generate(req_factory(), save=False).images[0], dtype=np.int16)
    assert np.array_equal(plain, again), "unloading the LoRA did not restore the base model"
    res = engine.generate(req_factory(loras=("style:0.8",)), save=False)
    assert "style:0.8" in res.infotexts[0]


@pytest.mark.parametrize(("spec", "msg"), [("nope:1", "not a known LoRA"), ("../x:1", "not a path"),
                                           ("style:abc", "number"), ("style:9", "between")])
def test_bad_lora_specs(lora_manager, req_factory, spec, msg):
    from pipelines.engine import Engine

    with pytest.raises(ValidationError, match=msg):
        Engine(lora_manager, None).generate(req_factory(loras=(spec,)), save=False)
