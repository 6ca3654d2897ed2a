"""A1111's infotext format: the key-value line (regex, quoting), the prompt split, and the name tables that map
A1111's keys and names to ours (`modules/infotext_utils.py`, `modules/processing.py`, sd-webui-controlnet).

Which request field an A1111 key records is declared in the field's schema (`infotext=` in `pipelines.request`);
the tables here are derived from it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pipelines.denoise.schedulers import SAMPLERS
from pipelines.request.schema import UpscaleRequest, schema_fields, unit_fields

log = logging.getLogger(__name__)

TESSERA_KEY = "Tessera"
# A1111 has no hires pass after img2img, so there its "Denoising strength" is the img2img strength; an image made from
# an init image with hires keeps that meaning and records the hires denoise under this key of ours (tessera-0.2).
HIRES_DENOISE_KEY = "Hires denoising strength"
# A1111 keys that paste a setting (its `infotext_to_setting_name_mapping`): "VAE" sets `sd_vae`, the VAE file.
SETTING_KEYS = frozenset({"VAE", "VAE hash"})

# A1111's key-value regex (infotext_utils.re_param_code); values with , : " are json.dumps-quoted.
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_WS_RUN = re.compile(r"\s*")
_KEY_RUN = re.compile(r"[\w \-/]*")
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
EXTRA_KEY_RE = re.compile(r"\w[\w \-/]*[\w\-/]")

# Our upscaler names -> A1111's display names; unknown names (upscaler files) are written and read as they are.
UPSCALER_NAMES = {
    "lanczos": "Lanczos",
    "latent": "Latent",
    "latent-bicubic": "Latent (bicubic)",
    "latent-nearest-exact": "Latent (nearest-exact)",
    "latent-antialiased": "Latent (antialiased)",
}
UPSCALER_FROM_A1111 = {v.lower(): k for k, v in UPSCALER_NAMES.items()}


# flat field -> the A1111 key that records it (the schema's `infotext=`); a key may record two fields
INFOTEXT_KEYS: dict[str, str] = {n: ff.spec.infotext for n, ff in schema_fields().items() if ff.spec.infotext}
UPSCALE_KEYS: dict[str, str] = {n: ff.spec.infotext for n, ff in schema_fields(UpscaleRequest).items()
                                if ff.spec.infotext}
# Keys this module reads; `extra` may not use them. At least one of CORE_KEYS marks a text as infotext.
CORE_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", TESSERA_KEY)
KNOWN_KEYS = frozenset({"Prompt", "Negative prompt", "Schedule type", "CFG schedule", "Size", "Model hash",
                        "Hires resize", "Hires schedule type", "Version", TESSERA_KEY, HIRES_DENOISE_KEY,
                        *SETTING_KEYS, *INFOTEXT_KEYS.values()})
OLD_TIMELINES_KEY = INFOTEXT_KEYS["prompt_timeline"]  # A1111's name of its `use_old_scheduling` option
# A1111's inpainting keys -> flat fields (values are ours lower-cased)
INPAINT_KEYS = {INFOTEXT_KEYS[n]: n for n, ff in schema_fields().items() if ff.group == "inpaint" and n in INFOTEXT_KEYS}
# sd-webui-controlnet's unit keys -> ControlUnit fields (Threshold A/B are canny's thresholds only for canny)
CONTROL_KEYS = {ff.spec.infotext: n for n, ff in unit_fields().items() if ff.spec.infotext}


# ---------------------------------------------------------------- text helpers

def number(x: Any) -> str:
    """Shortest text reading back to the same number (`7`, `0.35`); non-numbers via str()."""
    if isinstance(x, float):
        short = f"{x:g}"
        return short if float(short) == x else repr(x)
    return str(x)


def quote(value: str) -> str:
    """A1111's `quote`: json.dumps the value when it would break the key-value line, else leave it."""
    risky = any(c in value for c in ',:"') or value != value.strip() or not value.isprintable()
    return json.dumps(value, ensure_ascii=False) if risky else value


def unquote(value: str) -> str:
    """A1111's `unquote`: json.loads a "quoted" value; anything that does not decode stays as it is."""
    try:
        out = json.loads(value)
    except ValueError:
        return value
    return out if isinstance(out, str) else value


def param_pairs(line: str) -> list[tuple[str, str]]:
    """`PARAM_RE.findall(line)` in linear time: skips start positions that must fail the same way.

    A plain findall rescans a long run of key characters (or whitespace) from every position in it, which is
    quadratic on hostile text; a failed start inside such a run fails for every later start in the run.
    """
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    while pos < n:
        m = PARAM_RE.match(line, pos)
        if m:
            out.append((m[1], m[2]))
            pos = m.end()
            continue
        ws_match = _WS_RUN.match(line, pos)
        assert ws_match is not None  # \s* matches the empty string anywhere
        ws_end = ws_match.end()
        if ws_end > pos:  # every start in the whitespace lands on ws_end, like a start at ws_end itself
            pos = ws_end + 1
            continue
        key_match = _KEY_RUN.match(line, pos)
        assert key_match is not None  # [...]* matches the empty string anywhere
        run_end = key_match.end()
        pos = run_end if run_end > pos and line[run_end:run_end + 1] != ":" else pos + 1
    return out


def split_prompt(lines: list[str]) -> tuple[str, str]:
    """A1111's prompt / negative prompt split: stripped lines, `Negative prompt:` starts the negative."""
    prompt, negative, in_negative = "", "", False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", "Steps": "25", ...} with quoted values unquoted; never raises.

    The last line is the key-value line when A1111's regex finds at least 3 pairs in it; otherwise the whole
    text is prompt. Later duplicates of a key win, as in A1111.
    """
    *lines, last = str(text).strip().split("\n")
    pairs = param_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative = split_prompt(lines)
    out = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in pairs:
        if key in out and key in ("Prompt", "Negative prompt"):
            continue
        out[key] = unquote(value) if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return out



# sd-webui-controlnet's preprocessor names for the ones this app has under another name
MODULE_ALIASES = {"depth_midas": "depth", "openpose_full": "openpose", "lineart_realistic": "lineart",
                   "lineart_anime": "lineart-anime", "softedge_hed": "softedge", "softedge_pidinet": "softedge-pidinet",
                   "scribble_hed": "scribble", "normal_bae": "normal"}


def base_sampler(name: str) -> str:
    """Our "DPM++ 2M Karras" -> A1111 ≥1.9's Sampler "DPM++ 2M" (the Karras part goes to Schedule type)."""
    return name[: -len(" Karras")] if isinstance(name, str) and name.endswith(" Karras") else name


def sampler_of(name: str, schedule: str | None) -> str:
    """A1111 Sampler + Schedule type -> our sampler name; older "DPM++ 2M Karras" alone works too.

    Names we do not have are kept (the engine's `check_sampler` reports them); a schedule type we cannot do
    for that sampler is dropped with a warning.
    """
    lower = {k.lower(): k for k in SAMPLERS}
    name = name.strip()
    schedule = (schedule or "Automatic").strip()
    wanted = f"{name} Karras" if schedule.lower() == "karras" and not name.endswith(" Karras") else name
    if wanted.lower() in lower:
        return lower[wanted.lower()]
    if name.lower() in lower and schedule.lower() not in ("automatic", "default"):
        log.warning("schedule type %r is not available for sampler %r; using %r", schedule, name, lower[name.lower()])
        return lower[name.lower()]
    return wanted


