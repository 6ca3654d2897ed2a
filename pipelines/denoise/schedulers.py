"""Sampler names users know (A1111 / ComfyUI) -> a configured diffusers scheduler."""

from __future__ import annotations

from typing import Any

from pipelines.errors import ValidationError

# name -> (diffusers class name, config overrides). Karras variants use Karras et al. 2022 sigmas.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 3M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "LCM": ("LCMScheduler", {}),
}
# Keys a scheduler must not inherit from another scheduler's config (they change its algorithm).
_RESET = ("algorithm_type", "solver_order", "use_karras_sigmas", "skip_prk_steps", "solver_type",
          "lower_order_final", "euler_at_final", "final_sigmas_type")


def sampler_names() -> list[str]:
    """All sampler names, in display order."""
    return list(SAMPLERS)


def check_sampler(name: str, field: str = "sampler") -> str:
    """Return `name` if known (case-insensitive match allowed), else raise naming the choices."""
    if name in SAMPLERS:
        return name
    for known in SAMPLERS:
        if isinstance(name, str) and known.lower() == name.strip().lower():
            return known
    raise ValidationError(field, name, f"must be one of: {', '.join(SAMPLERS)}")


def schedule_type(name: str) -> str:
    """A1111's "Schedule type" metadata value for a sampler."""
    return "Karras" if "Karras" in name else "Automatic"


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler `name`, inheriting the model's training config (betas, prediction type...)."""
    import diffusers

    cls_name, overrides = SAMPLERS[check_sampler(name)]
    config = {k: v for k, v in dict(base_config).items() if k not in _RESET and not k.startswith("_")}
    if cls_name == "DDIMScheduler" or cls_name == "LCMScheduler":
        config.setdefault("clip_sample", False)
    try:
        return getattr(diffusers, cls_name).from_config(config, **overrides)
    except ImportError as err:  # LMS needs scipy: diffusers then holds a placeholder class that raises
        raise ValidationError("sampler", name, "needs scipy, missing here: pip install -r requirements.txt, "
                              "or pick another sampler") from err

