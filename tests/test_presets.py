"""Presets by device: the CPU tier on a CPU, a few-step LoRA first when one is present, as the UI/API and CLI get
them (`Backend.request`, `Backend.describe`, `cli._request`)."""

from __future__ import annotations

import pytest

from pipelines.engine import Engine
from pipelines.models.manager import ModelManager
from pipelines.serving.service import Backend


def _backend(tmp_path, device: str) -> Backend:
    return Backend(Engine(ModelManager(tmp_path / "models", device=device, dtype="fp32"), None))


def test_draft_on_a_cpu_is_the_cpu_tier_and_says_so(tmp_path):
    cpu, gpu = _backend(tmp_path, "cpu"), _backend(tmp_path, "cuda")  # nothing loads: the GPU is never touched
    values = {"preset": "draft", "prompt": "a fox", "model": "tiny"}
    on_cpu, on_gpu = cpu.request(values), gpu.request(values)
    assert (on_cpu.width, on_cpu.height, on_cpu.steps) == (384, 384, 6)
    assert (on_gpu.width, on_gpu.height, on_gpu.steps) == (512, 512, 8)
    for req in (on_cpu, on_gpu):  # DeepCache's default on both: interval 3, branch 0, TAESD
        assert (req.feature_cache, req.feature_cache_interval, req.feature_cache_branch, req.vae_decode) == (
            "on", 3, 0, "taesd")
    assert "**draft**: CPU tier: 384×384, 6 steps" in cpu.describe(values)
    assert "CPU tier" not in gpu.describe(values)
    assert cpu.choices()["presets"]["balanced"].startswith("CPU tier: 512×512, 16 steps")
    assert cpu.preset_values("balanced")["hires_scale"] == 1 and gpu.preset_values("balanced")["hires_scale"] == 1.5
    # a user's own value still wins over the tier
    assert cpu.request({**values, "steps": 3}).steps == 3


@pytest.mark.parametrize("lora, family_model, sampler", [("lcm-lora-sdv1-5", "tiny", "LCM"),
                                                          ("sdxl-lightning-4step-lora", "tiny-sdxl", "Euler"),
                                                          ("sd-turbo-lora", "tiny", "Euler a")])
def test_a_present_few_step_lora_is_the_drafts_first_choice(tmp_path, lora, family_model, sampler):
    backend = _backend(tmp_path, "cpu")
    folder = tmp_path / "models" / "lora"
    folder.mkdir(parents=True)
    (folder / f"{lora}.safetensors").write_bytes(b"")
    (folder / "lcm-lora-other-xl.safetensors" if family_model == "tiny" else folder / "lcm-lora-sdv1-5.safetensors"
     ).write_bytes(b"")  # another family's LoRA is never picked
    values = {"preset": "draft", "prompt": "a fox", "model": family_model}
    req = backend.request(values)
    assert (req.loras, req.sampler, req.steps, req.feature_cache) == ((f"{lora}:1",), sampler, 4, "off")
    assert (req.width, req.height) == (384, 384)  # the CPU sizes still hold
    assert f"LoRA {lora} (few-step, present in models/lora): 4 steps" in backend.describe(values)
    plain = backend.request({**values, "preset": "fast"})
    assert plain.loras == () and plain.steps == 12  # only the draft tier takes it


def test_cli_prints_the_tier_it_runs(tmp_path, capsys):
    import cli

    args = cli.build_parser().parse_args(["generate", "--device", "cpu", "--preset", "draft", "--prompt", "a fox",
                                          "--models-dir", str(tmp_path / "models"), "--model", "tiny"])
    req = cli._request(args, cli._engine(args))
    assert (req.width, req.steps, req.feature_cache_branch) == (384, 6, 0)
    assert "preset draft: CPU tier: 384×384, 6 steps" in capsys.readouterr().err
