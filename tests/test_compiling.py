"""The one rule for when a run compiles its net (`pipeline.train.compiling.decide`)."""

from __future__ import annotations

import pytest
import torch

from pipeline import config as C
from pipeline.train import compiling

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
LONG = compiling.MIN_STEPS


@pytest.fixture
def native_bf16(monkeypatch):
    def set_to(value: bool) -> None:
        monkeypatch.setattr(compiling, "cpu_has_fast_bf16", lambda: value)
    return set_to


def test_told_on_or_off_is_obeyed_whatever_the_hardware(native_bf16):
    native_bf16(False)
    assert compiling.decide("on", CPU, None, 1).compile
    native_bf16(True)
    assert not compiling.decide("off", CPU, torch.bfloat16, 10 * LONG).compile


def test_auto_compiles_only_long_bf16_runs_on_cpus_with_native_bf16(native_bf16, monkeypatch):
    monkeypatch.setattr(compiling, "cxx_compiler", lambda: "g++")
    native_bf16(True)
    assert compiling.decide("auto", CPU, torch.bfloat16, LONG).compile
    short = compiling.decide("auto", CPU, torch.bfloat16, LONG - 1)
    assert not short.compile and f"{LONG - 1} steps are too few" in short.line()
    assert not compiling.decide("auto", CPU, None, LONG).compile  # fp32
    assert not compiling.decide("auto", GPU, torch.bfloat16, LONG).compile
    native_bf16(False)
    # --amp bf16 forced on a CPU without native kernels: the slow reference path, not fused.
    assert not compiling.decide("auto", CPU, torch.bfloat16, LONG).compile


def test_auto_stays_eager_without_a_cxx_compiler(native_bf16, monkeypatch):
    native_bf16(True)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    decision = compiling.decide("auto", CPU, torch.bfloat16, LONG)
    assert not decision.compile and "no C++ compiler" in decision.line()


@pytest.mark.parametrize("given, stored", [(True, "on"), (False, "off"), ("auto", "auto")])
def test_configs_written_when_compile_was_a_bool_still_load(given, stored):
    data = C.Config().to_dict()
    data["train"]["compile"] = given
    assert C.Config.from_dict(data).train.compile == stored
