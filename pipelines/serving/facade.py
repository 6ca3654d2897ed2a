"""The Engine face of the serving back-ends that stand in for one Engine (`pipelines.serving.workers.WorkerPool`,
`pipelines.serving.cluster.ClusterEngine`): read-only services are forwarded to one local engine, which loads no
weights for them, so `pipelines.serving.service`, the UI, the API and the CLI need no other code."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EngineFacade:
    """check, plan, count_tokens, manager, limits, outputs_dir and default_model of `_local_engine()`; setting
    `default_model` sets it on every engine of `_engines()`. Subclasses add generate (and upscale)."""

    def _local_engine(self) -> Any:
        raise NotImplementedError

    def _engines(self) -> list[Any]:
        return [self._local_engine()]

    @property
    def manager(self) -> Any:
        return self._local_engine().manager

    @property
    def default_model(self) -> str:
        return self._local_engine().default_model

    @default_model.setter
    def default_model(self, name: str) -> None:
        for engine in self._engines():
            engine.default_model = name

    @property
    def limits(self) -> Any:
        return self._local_engine().limits

    @property
    def outputs_dir(self) -> Path | None:
        return self._local_engine().outputs_dir

    def check(self, req: Any) -> Any:
        return self._local_engine().check(req)

    def plan(self, req: Any, model: Any = None, **kw: Any) -> Any:
        return self._local_engine().plan(req, model, **kw)

    def count_tokens(self, model_name: str, text: str) -> str:
        return self._local_engine().count_tokens(model_name, text)
