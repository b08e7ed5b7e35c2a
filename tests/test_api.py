"""The public surface: exports, typing marker, error hierarchy."""

from __future__ import annotations

from pathlib import Path

import gpuexec
from gpuexec import errors


def test_all_names_resolve_and_are_exactly_the_public_surface() -> None:
    assert sorted(gpuexec.__all__) == sorted([
        "ConfigError", "ContextAction", "CudaDriverError", "DeviceReport", "Executor",
        "ExecutorClosedError", "GpuexecError", "InvalidArgumentError", "ProtocolError",
        "RankStatus", "Recovery", "RemoteError", "RespawnReport", "RpcTimeoutError",
        "StartMethodError", "SuspendReport", "ValueNotCarriedError", "Worker",
        "WorkerDiedError", "WorkerInfo", "WorkerStartupError", "__version__", "errors"])
    for name in gpuexec.__all__:
        assert getattr(gpuexec, name) is not None
    assert gpuexec.__version__.count(".") == 2


def test_py_typed_marker_ships() -> None:
    assert (Path(gpuexec.__file__).parent / "py.typed").is_file()


def test_one_exception_root() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls is errors.CallCancelled:  # raised into worker code, never out of the API
            assert issubclass(cls, BaseException) and not issubclass(cls, Exception)
            continue
        assert issubclass(cls, errors.GpuexecError), name
    assert issubclass(errors.RpcTimeoutError, TimeoutError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.StartMethodError, errors.ConfigError)


def test_worker_died_error_fields_and_message() -> None:
    e = errors.WorkerDiedError(2, 1234, -9, "last line\n")
    assert (e.rank, e.pid, e.exitcode, e.signal_name) == (2, 1234, -9, "SIGKILL")
    assert "rank 2" in str(e) and "SIGKILL" in str(e) and "out-of-memory" in str(e)
    assert str(e).count("SIGKILL") == 1, str(e)  # said once: "killed by SIGKILL (often ...)"
    assert "last line" in str(e)
    e3 = errors.WorkerDiedError(0, 1, 3)
    assert e3.signal_name is None and "exited with code 3" in str(e3)


def test_cuda_driver_error_fields() -> None:
    e = errors.CudaDriverError("cuInit", 100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device")
    assert (e.function, e.code, e.name) == ("cuInit", 100, "CUDA_ERROR_NO_DEVICE")
    assert str(e) == "cuInit failed: CUDA_ERROR_NO_DEVICE (100): no CUDA-capable device"
