"""torch is optional: the features that need it say so, with a typed error naming the
extra. (The core without torch installed at all: tests/test_install.py.)"""

from __future__ import annotations

import sys

import pytest
import torch
from workers import EchoWorker

from gpuexec import Executor
from gpuexec.errors import GpuexecError, MissingDependencyError
from gpuexec.ipc.codec import Decoder, Encoder, MalformedMessage
from gpuexec.ipc.messages import Reply
from gpuexec.optional import require_torch, torch_installed


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import torch`` fails in this process, as where torch is not installed."""
    monkeypatch.setitem(sys.modules, "torch", None)


def test_require_torch_names_the_feature_and_the_extra(no_torch: None) -> None:
    assert not torch_installed()
    with pytest.raises(MissingDependencyError) as info:
        require_torch("tensor payloads")
    err = info.value
    assert isinstance(err, GpuexecError) and isinstance(err, ImportError)
    assert (err.feature, err.package, err.extra, err.name) == (
        "tensor payloads", "torch", "torch", "torch")
    assert str(err) == ("tensor payloads needs torch, which is not installed here: "
                        "pip install 'gpuexec[torch]' (or install torch yourself)")


def test_require_torch_returns_torch_when_installed() -> None:
    assert torch_installed()
    assert require_torch("anything") is torch


def test_distributed_backend_without_torch_fails_before_any_process(
        no_torch: None, no_leaks: None) -> None:
    with pytest.raises(MissingDependencyError, match=r"distributed_backend='gloo' needs torch"):
        Executor(EchoWorker, 2, device="cpu", distributed_backend="gloo")


def test_core_runs_with_torch_unimportable_in_the_driver(no_torch: None,
                                                         no_leaks: None) -> None:
    import numpy as np

    with Executor(EchoWorker, 2, device="cpu", start_method="fork") as ex:
        out = ex.collective_rpc(lambda w, a: a * (w.rank + 1), args=(np.arange(3),))
        assert ex.collective_rpc(lambda w: "torch" in sys.modules and
                                 sys.modules["torch"] is None) == [True, True]
    assert [o.tolist() for o in out] == [[0, 1, 2], [0, 2, 4]]


def test_a_tensor_arriving_where_torch_is_missing_is_refused_by_name(
        monkeypatch: pytest.MonkeyPatch) -> None:
    frames = Encoder(allow_pickle=False).encode(Reply(1, 0, torch.arange(4)))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MalformedMessage, match=r"a tensor \(torch.int64\): torch is not installed"):
        Decoder(Reply, allow_pickle=False).decode(frames)
