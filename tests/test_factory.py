"""app.py and cli.py build their ModelManager + Engine through one factory (`pipelines.factory`)."""

from __future__ import annotations

import pytest

from pipelines.engine import Engine
from pipelines.factory import build_engine
from pipelines.options import EngineOptions
from pipelines.serving.workers import WorkerPool

MACHINE = ["--device", "cpu", "--dtype", "fp32", "--attention", "sdpa", "--offload"]


def _manager_settings(engine: Engine) -> tuple:
    m = engine.manager
    return m.models_dir, m._device_arg, m._dtype_arg, m.attention, m.compile_unet, m.offload, engine.outputs_dir


def _args(tmp_path):
    from app import ui_parser
    from cli import build_parser

    common = [*MACHINE, "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out")]
    return ui_parser().parse_args(common), build_parser().parse_args(["generate", *common])


def test_app_and_cli_options_are_the_same_but_for_model_paths(tmp_path):
    app_args, cli_args = _args(tmp_path)
    app, cli = EngineOptions.from_args(app_args), EngineOptions.from_args(cli_args, allow_paths=True)
    assert app.offload and app.device == "cpu" and app.dtype == "fp32"
    assert EngineOptions(**{**vars(app), "allow_paths": True}) == cli


def test_app_and_cli_build_the_same_kind_of_engine_from_the_same_args(tmp_path):
    app_args, cli_args = _args(tmp_path)
    pool = build_engine(app_args, pool=True)
    engine = build_engine(cli_args, allow_paths=True)
    assert isinstance(pool, WorkerPool) and len(pool) == 1 and type(engine) is Engine
    (worker,) = pool.workers
    assert type(worker.engine) is Engine and worker.name == "0:cpu"
    assert _manager_settings(worker.engine) == _manager_settings(engine)
    assert (worker.engine.allow_paths, engine.allow_paths) == (False, True)
    assert worker.engine.manager is not engine.manager and worker.engine.manager.current is None  # nothing loaded


def test_several_devices_give_a_pool_from_either_entry_point(tmp_path):
    opts = EngineOptions(models_dir=tmp_path, outputs_dir=None, devices="cpu,cpu", split="on", dtype="fp32")
    pool = build_engine(opts)
    assert isinstance(pool, WorkerPool) and len(pool) == 2 and pool.split == "on"
    managers = [w.engine.manager for w in pool.workers]
    assert managers[0] is not managers[1] and {m._dtype_arg for m in managers} == {"fp32"}


@pytest.mark.parametrize("entry", ["app", "cli"])
def test_app_and_cli_call_the_factory(tmp_path, monkeypatch, entry):
    import pipelines.factory as factory

    calls = []
    real = factory.build_engine

    def spy(args, **kwargs):
        calls.append(kwargs)
        return real(args, **kwargs)

    monkeypatch.setattr(factory, "build_engine", spy)
    app_args, cli_args = _args(tmp_path)
    if entry == "app":
        from app import build_demo

        app_args.model = "tiny"
        build_demo(app_args)
        assert calls == [{"pool": True}]
    else:
        from cli import _engine

        assert type(_engine(cli_args)) is Engine
        assert calls == [{"allow_paths": True}]


def test_the_machine_options_are_declared_once_for_app_and_cli():
    """Every EngineOptions field marked as an option is the same option (flag, default, help, choices) in both
    parsers, and nothing else in them sets an EngineOptions field."""
    import dataclasses

    from app import ui_parser
    from cli import build_parser

    declared = {f.metadata["flag"]: f for f in dataclasses.fields(EngineOptions) if "flag" in f.metadata}
    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    for parser in (ui_parser(), generate):
        actions = {a.option_strings[0]: a for a in parser._actions if a.dest in {f.name for f in declared.values()}}
        assert set(actions) == set(declared)
        for flag, f in declared.items():
            a = actions[flag]
            assert (a.dest, a.default, a.choices) == (f.name, f.default, f.metadata["argparse"].get("choices"))
            assert a.help.startswith(f.metadata["help"])


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, "float32"), (True, False, "bfloat16"),
                                                        (False, True, "bfloat16")])
def test_dtype_auto_on_a_cpu_is_bf16_exactly_when_torch_reports_native_bf16(tmp_path, monkeypatch, avx512_bf16, amx,
                                                                             expected):
    """`--dtype auto` (the CLI's default) on a CPU: bf16 when torch reports AVX512-BF16 or AMX, else fp32; the plan
    line says which; an explicit --dtype wins either way."""
    import torch

    from cli import build_parser
    from tests.conftest import tiny_request

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    common = ["--device", "cpu", "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out")]
    auto = build_engine(build_parser().parse_args(["generate", *common]), allow_paths=True)
    assert auto.manager.device_dtype == (torch.device("cpu"), getattr(torch, expected))
    line = auto.plan(tiny_request()).describe()
    native = avx512_bf16 or amx
    assert line.endswith("bf16 (native bf16 on this CPU)" if native else "fp32 (no native bf16 on this CPU)"), line
    for forced in ("fp32", "bf16"):
        engine = build_engine(build_parser().parse_args(["generate", *common, "--dtype", forced]), allow_paths=True)
        assert engine.manager.device_dtype[1] == {"fp32": torch.float32, "bf16": torch.bfloat16}[forced]
