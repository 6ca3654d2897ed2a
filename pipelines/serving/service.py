"""The UI's backend: plain callables over the engine (flat values in, events out), so `ui/` needs no torch.

`generate`/`upscale` run the engine in a worker thread and yield `Progress` events (with TAESD previews) and a
final `Done`. Closing the generator (Gradio's Stop button, a client that went away) sets the cancel token;
the loop stops within one step and the GPU lock is released.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from pipelines.errors import TesseraError, ValidationError
from pipelines.lru import LRUCache
from pipelines.request.schema import (
    CONTROL_FIELDS,
    ControlUnit,
    GenerationRequest,
    UpscaleRequest,
    flatten,
    from_flat,
    schema_fields,
)
from pipelines.serving.units import UI_CONTROL_UNITS, control_name

log = logging.getLogger(__name__)

# The UI's and the API's ControlNet units: control_image, control_scale, ... then control2_image, ... (flat names)
_UNIT_NAMES = [{control_name(i, f): f for f in CONTROL_FIELDS} for i in range(UI_CONTROL_UNITS)]
_EXTRA_KEYS = {"preset", "init_image", "preview_every", "mask", "inpaint_editor",
               *(n for names in _UNIT_NAMES for n in names)}
_UNIT_FIELD = re.compile(r"control\[(\d+)\]\.(\w+)")


@dataclass
class Progress:
    """A step finished: counts, estimated seconds left, and (every few steps) a preview image."""

    step: int
    total: int
    eta_s: float | None
    preview: Image.Image | None
    stage: str = "draft"


@dataclass
class Done:
    """The run finished: images (already saved), their files and metadata."""

    images: list[Image.Image]
    paths: list[str]
    infotexts: list[str]
    seeds: list[int]
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class RunToken(threading.Event):
    """One run's cancel token: `set()` stops the denoising loop before its next step (CancelledError, nothing
    saved). The engine calls `loop_finished()` once the last step is done: from then on the images are finished
    work; they are decoded and saved whatever the token says, and the stream announces it with a Progress of
    stage "finishing", after which the UI layer delivers the Done even to a caller that cancels."""

    def __init__(self, on_finished=None):
        super().__init__()
        self.finished = threading.Event()
        self._on_finished = on_finished

    def loop_finished(self) -> None:
        if not self.finished.is_set():
            self.finished.set()
            if self._on_finished is not None:
                self._on_finished()


class RunStream:
    """A run's events (Progress ..., Done) with `stop()`, callable from any thread (the UI's Stop button): it sets
    the run's token and leaves the stream running, so the caller still reads what the engine made of the stop,
    a CancelledError before the last denoising step ended (nothing saved), else the "finishing" Progress and the
    Done (A1111's Interrupt). `close()` stops the run and drops the rest, as closing the generator did."""

    def __init__(self, events: Generator[Progress | Done, None, None], cancel: threading.Event):
        self._events, self._cancel = events, cancel

    def __iter__(self) -> RunStream:
        return self

    def __next__(self) -> Progress | Done:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def stop(self) -> None:
        self._cancel.set()


class _Timer:
    """Steps/second over the run so far -> ETA; stage changes restart the step count."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stage, self.last_step = "draft", -1

    def tick(self, step: int, total: int) -> tuple[str, float | None]:
        if step <= self.last_step:
            self.stage, self.start = "refine", time.perf_counter()
        self.last_step = step
        done = step + 1
        elapsed = time.perf_counter() - self.start
        return self.stage, (elapsed / done * (total - done)) if done else None


class Backend:
    """Callables the UI and the Gradio API use. One instance per app."""

    def __init__(self, engine):
        self.engine = engine
        self._checked = LRUCache(32)  # id(values) -> (values, request): the UI's check, then its generate
        self._checked_lock = threading.Lock()

    # ------------------------------------------------------------ requests
    def request(self, values: dict[str, Any]) -> GenerationRequest:
        """Flat UI/API values (None = preset/default) -> a validated request."""
        from pipelines.request.presets import load_presets, preset_for

        values = {k: v for k, v in values.items() if v is not None and not (isinstance(v, str) and v == "" and
                                                                              k not in ("prompt", "negative_prompt"))}
        base = GenerationRequest(model=self.engine.default_model)
        preset = values.get("preset")
        if preset:
            presets = load_presets()
            if not isinstance(preset, str) or preset not in presets:
                raise ValidationError("preset", preset, f"must be one of: {', '.join(presets)}")
            base = preset_for(presets[preset], self.engine.manager, values.get("model") or base.model).apply(base)
        flat = {k: v for k, v in values.items() if k not in _EXTRA_KEYS}
        if isinstance(flat.get("loras"), str):
            flat["loras"] = tuple(s.strip() for s in flat["loras"].split(",") if s.strip())
        req = from_flat(flat, base, source="the request")
        extra: dict[str, Any] = {}
        if values.get("init_image") is not None:
            extra["init_image"] = _image(values["init_image"], "init_image")
        extra.update(_mask_values(values))
        # units with an image, in order; unit_names[j] = the flat names of the j-th unit sent to the engine
        unit_names = [names for names in _UNIT_NAMES if values.get(next(iter(names))) is not None]
        if unit_names:
            extra["control"] = tuple(_control_unit(values, names) for names in unit_names)
        try:
            return self.engine.check(from_flat(extra, req)) if extra else self.engine.check(req)
        except ValidationError as exc:  # control[j].scale -> the name the caller used (control2_scale, ...)
            m = _UNIT_FIELD.fullmatch(exc.field)
            if m is None or int(m[1]) >= len(unit_names):
                raise
            flat = {f: n for n, f in unit_names[int(m[1])].items()}
            raise ValidationError(flat.get(m[2], exc.field), exc.value, exc.fix) from None

    def check(self, values: dict[str, Any]) -> None:
        """Validate the values; the same values object handed to `generate` next is not validated again."""
        req = self.request(values)
        with self._checked_lock:
            self._checked.put(id(values), (values, req))

    def _checked_request(self, values: dict[str, Any]) -> GenerationRequest:
        """The request `check` made of this very values object (kept alive with it), else a new validation."""
        with self._checked_lock:
            hit = self._checked.pop(id(values))
        return hit[1] if hit is not None and hit[0] is values else self.request(values)

    # ------------------------------------------------------------ long-running calls
    def generate(self, values: dict[str, Any]) -> Iterator[Progress | Done]:
        req = self._checked_request(values)
        every = int(values.get("preview_every") or 0)
        return self._stream(lambda cb, cancel: self.engine.generate(req, callback=cb, cancel=cancel), every)

    def upscale(self, values: dict[str, Any]) -> Iterator[Progress | Done]:
        image = _image(values.get("image"), "image")
        kwargs = {k: values[k] for k in schema_fields(UpscaleRequest) if k != "image" and values.get(k) is not None}
        return self._stream(lambda cb, cancel: self.engine.upscale(image, callback=cb, cancel=cancel, **kwargs), 0)

    def _stream(self, run, preview_every: int) -> Iterator[Progress | Done]:
        events: queue.Queue = queue.Queue()
        timer = _Timer()
        last: list[int] = [1]  # the step count of the loop that ran last (1 when there is no loop: a plain upscale)

        def finishing() -> None:
            events.put(Progress(last[0], last[0], 0.0, None, "finishing"))

        cancel = RunToken(on_finished=finishing)

        def callback(info) -> None:
            last[0] = info.total
            stage, eta = timer.tick(info.step, info.total)
            preview = None
            if preview_every and (info.step + 1) % preview_every == 0 and info.step + 1 < info.total:
                preview = self._preview(info.denoised)
            events.put(Progress(info.step + 1, info.total, eta, preview, stage))

        def work() -> None:
            try:
                events.put(run(callback, cancel))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                events.put(exc)

        worker = threading.Thread(target=work, name="tessera-generate", daemon=True)
        return RunStream(self._consume(events, cancel, worker), cancel)

    @staticmethod
    def _consume(events: queue.Queue, cancel: RunToken, worker: threading.Thread):
        worker.start()  # on the first next(): a stream dropped before it was iterated runs nothing
        delivered = False
        try:
            while True:
                item = events.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Progress):
                    yield item
                    continue
                delivered = True
                yield Done(item.images, [str(p) for p in item.paths], item.infotexts, item.seeds, item.stats,
                           item.warnings)
                return
        finally:
            cancel.set()  # Stop / client gone: the loop sees it at its next step and releases the GPU lock
            worker.join(timeout=120)
            if not delivered and getattr(cancel, "finished", None) is not None and cancel.finished.is_set():
                log.info("stopped after the last denoising step: the images were finished and are saved")

    def _preview(self, denoised) -> Image.Image | None:
        return safe_preview(self.engine, denoised)

    # ------------------------------------------------------------ small services
    def describe(self, values: dict[str, Any]) -> str:
        """What these settings will do, with the planner's estimate (markdown)."""
        from pipelines.request.presets import load_presets, preset_for

        try:
            req = self.request(values)
        except TesseraError as exc:
            return f"**Check settings:** {exc}"
        lines = []
        preset = values.get("preset")
        if preset:
            tier = preset_for(load_presets()[preset], self.engine.manager, values.get("model") or req.model)
            lines.append(f"**{preset}**: {tier.description}")
        stage = f"{req.width}×{req.height}, {req.steps} steps {req.sampler}, CFG `{req.cfg}`"
        if req.hires.enabled:
            from pipelines.request.hires import hires_denoise
            from pipelines.request.validation import hires_target

            tw, th = hires_target(req.width, req.height, req.hires.scale)
            stage += (f" → {req.hires.upscaler} ×{req.hires.scale:g} to {tw}×{th}, refine "
                      f"{req.hires.steps or req.steps} steps at denoise {hires_denoise(req):g}")
            plan = self.engine.plan(req, width=tw, height=th)
        else:
            plan = self.engine.plan(req)
        lines.append(stage)
        lines.append(f"Plan: {plan.describe()}")
        return "\n\n".join(lines)

    def region_preview(self, regions: Any, width: Any, height: Any) -> Image.Image:
        """The canvas with the regions' boxes drawn and labelled (the UI's Regions preview); bad rows raise the
        request's ValidationError."""
        from pipelines.request.regions import preview_regions, validate_regions

        w, h = int(width or 512), int(height or 512)
        return preview_regions(validate_regions(regions, w, h, self.engine.limits.max_prompt_chars), w, h)

    def token_count(self, model: str, text: str) -> str:
        try:
            return self.engine.count_tokens(model or self.engine.default_model, text or "")
        except Exception as exc:  # the counter is advisory: never fail the page for it
            log.debug("token count unavailable: %s", exc)
            return ""

    def cfg_plot(self, cfg: str, steps: int) -> Image.Image:
        from pipelines.denoise.guidance import plot_schedule
        from pipelines.request.cfg import parse_cfg

        return plot_schedule(parse_cfg(cfg), max(1, int(steps or 1)))

    def read_info(self, image) -> tuple[str, dict]:
        """An uploaded image (its path, or opened) -> (parameters text, flat values); checked from the header
        (format, 64 MP) and read without decoding a pixel."""
        from pipelines.image_info import read_parameters
        from pipelines.metadata import request_from_infotext

        if image is None:
            raise ValidationError("image", None, "is required: upload a PNG made by Tessera or A1111")
        text = read_parameters(image, upload="image")
        if not text:
            raise ValidationError("image", "upload", "has no generation parameters (a PNG from Tessera/A1111 has them)")
        return text, {**flatten(request_from_infotext(text)), **_control_values(text)}

    def control_preview(self, image, type: str, low: int, high: int) -> Image.Image:
        from pipelines.control.units import control_map

        unit = ControlUnit(image=_image(image, "control_image"), type=type, low=int(low), high=int(high))
        return control_map(unit, self.engine.manager.models_dir, self.engine.manager.caches)

    def choices(self) -> dict[str, Any]:
        from pipelines.control.models import list_controlnets
        from pipelines.control.preprocessors import PREPROCESSORS
        from pipelines.denoise.schedulers import sampler_names
        from pipelines.models.upscalers import list_upscalers
        from pipelines.request.hires import LATENT_MIN_DENOISE
        from pipelines.request.presets import load_presets, preset_for

        models_dir = self.engine.manager.models_dir
        defaults = flatten(GenerationRequest(model=self.engine.default_model))
        return {
            "models": self.engine.manager.list_models(), "samplers": sampler_names(),
            "upscalers": list_upscalers(models_dir), "controlnets": list_controlnets(models_dir),
            "preprocessors": list(PREPROCESSORS),
            "presets": {n: preset_for(p, self.engine.manager, self.engine.default_model).description
                        for n, p in load_presets().items()},
            "defaults": defaults, "default_model": self.engine.default_model,
            "latent_min_denoise": LATENT_MIN_DENOISE,
            "notice": self.engine.manager.availability(self.engine.default_model),
        }

    def preset_values(self, name: str) -> dict[str, Any]:
        from pipelines.request.presets import load_presets, preset_for

        presets = load_presets()
        if name not in presets:
            raise ValidationError("preset", name, f"must be one of: {', '.join(presets)}")
        return dict(preset_for(presets[name], self.engine.manager, self.engine.default_model).values)


def safe_preview(engine, denoised) -> Image.Image | None:
    """A TAESD preview of the predicted x0 on the engine's current model; None (logged) if it cannot be made: a
    preview must never break a generation."""
    from pipelines.vae.io import preview

    model = engine.manager.current
    try:
        return preview(model, denoised) if model is not None else None
    except Exception as exc:
        log.warning("preview failed: %s", exc)
        return None


def _control_values(text: str) -> dict[str, Any]:
    """The ControlNet units' settings an infotext records, as the UI's flat values (images are not recorded);
    a preprocessor this app does not have is left out (the unit keeps its own)."""
    from pipelines.control.preprocessors import PREPROCESSORS
    from pipelines.metadata import control_settings

    out: dict[str, Any] = {}
    for i, unit in enumerate(control_settings(text, UI_CONTROL_UNITS)):
        out.update({control_name(i, f): v for f, v in unit.items() if f != "type" or v in PREPROCESSORS})
    return out


def _mask_values(values: dict[str, Any]) -> dict[str, Any]:
    """init_image and mask from the Inpaint tab's brush (its background and strokes) and the uploaded mask, which
    wins over the strokes."""
    from pipelines.edit.inpaint import editor_images, load_mask

    out: dict[str, Any] = {}
    image, painted = editor_images(values.get("inpaint_editor"))
    if image is not None:
        out["init_image"] = image
        if painted is not None:
            out["mask"] = painted
    if values.get("mask") is not None:
        out["mask"] = load_mask(values["mask"], "mask")
    return out


def _control_unit(values: dict[str, Any], names: dict[str, str]) -> ControlUnit:
    """One unit from its flat values ({flat name: ControlUnit field}); the image name comes first."""
    image_name = next(iter(names))
    fields = {f: values[n] for n, f in names.items() if f != "image" and n in values}
    return ControlUnit(image=_image(values[image_name], image_name), **fields)


def _image(value: Any, name: str) -> Image.Image:
    """An upload (PIL image, numpy array, file path) -> a checked RGB PIL image."""
    from pipelines.control.images import load_control_image

    if value is None:
        raise ValidationError(name, None, "is required: upload an image")
    try:
        return load_control_image(value)
    except ValidationError as exc:
        raise ValidationError(name, exc.value, exc.fix) from None


def make_backend(engine) -> Backend:
    """The backend the UI is composed with (app.py)."""
    return Backend(engine)


__all__ = ["Backend", "Done", "Progress", "RunStream", "RunToken", "make_backend"]
