"""CPU tests of the libcuda binding and of stale-context release, against a fake libcuda.

The fake (tests/fake_libcuda.c) is compiled once per session and per variant; its global
state is reset around every test because one library file is mapped once per process.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from fakecuda import FakeCuda, build_fake_libcuda  # tests/ is on sys.path (pytest "prepend")

from gpuexec.errors import CudaDriverError
from gpuexec.ipc.reports import ContextAction, DeviceReport
from gpuexec.worker.cuda_driver import (
    LIBCUDA_ENV,
    SYMBOL_NOT_FOUND,
    CudaDriver,
    load_driver,
)
from gpuexec.worker.stale_contexts import release_stale_contexts

REPO = Path(__file__).resolve().parent.parent

RELEASE = "cuDevicePrimaryCtxRelease_v2"
RESET = "cuDevicePrimaryCtxReset_v2"
GET_STATE = "cuDevicePrimaryCtxGetState"
UUID_0 = "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"  # starts with a NUL byte
UUID_1 = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"
UUID_2 = "GPU-20212223-2425-2627-2829-2a2b2c2d2e2f"
UUID_3 = "GPU-30313233-3435-3637-3839-3a3b3c3d3e3f"

Variant = Callable[..., tuple[FakeCuda, CudaDriver]]


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fakecuda")


@pytest.fixture
def fake(build_dir: Path) -> Iterator[FakeCuda]:
    handle = FakeCuda(build_fake_libcuda(build_dir))
    handle.reset()
    yield handle
    handle.reset()


@pytest.fixture
def driver(fake: FakeCuda) -> CudaDriver:
    loaded = load_driver(str(fake.path))
    assert loaded is not None
    return loaded


@pytest.fixture
def variant(build_dir: Path) -> Iterator[Variant]:
    """Build (once per session) and load a variant of the fake without some symbols."""
    made: list[FakeCuda] = []

    def make(*defines: str) -> tuple[FakeCuda, CudaDriver]:
        handle = FakeCuda(build_fake_libcuda(build_dir, defines=defines))
        handle.reset()
        made.append(handle)
        loaded = load_driver(str(handle.path))
        assert loaded is not None
        return handle, loaded

    yield make
    for handle in made:
        handle.reset()


# -- loading ---------------------------------------------------------------------------------


def test_missing_library_gives_none(tmp_path: Path) -> None:
    assert load_driver(str(tmp_path / "libcuda.so.1")) is None


def test_file_that_is_not_a_library_gives_none(tmp_path: Path) -> None:
    bogus = tmp_path / "libcuda.so.1"
    bogus.write_text("not an ELF file\n")
    assert load_driver(str(bogus)) is None


def test_env_override_is_read_at_call_time(fake: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LIBCUDA_ENV, str(fake.path))
    loaded = load_driver()
    assert loaded is not None
    assert loaded.path == str(fake.path)
    loaded.init()
    assert loaded.device_count() == 2
    assert fake.calls("cuInit") == 1


def test_env_override_to_a_missing_file_gives_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIBCUDA_ENV, str(tmp_path / "missing" / "libcuda.so.1"))
    assert load_driver() is None


def test_explicit_path_beats_env(
    fake: FakeCuda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LIBCUDA_ENV, str(tmp_path / "missing.so"))
    loaded = load_driver(str(fake.path))
    assert loaded is not None
    assert loaded.path == str(fake.path)


@pytest.mark.parametrize("env", [None, ""])
def test_default_is_the_driver_soname(env: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def no_library(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        opened.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    if env is None:
        monkeypatch.delenv(LIBCUDA_ENV, raising=False)
    else:
        monkeypatch.setenv(LIBCUDA_ENV, env)
    monkeypatch.setattr(ctypes, "CDLL", no_library)  # the module looks it up at call time
    assert load_driver() is None
    assert opened == ["libcuda.so.1"]


def test_import_loads_no_cuda_and_no_torch() -> None:
    code = (
        "import sys\n"
        "import gpuexec.worker.cuda_driver, gpuexec.worker.stale_contexts, gpuexec.ipc.reports\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libcuda' not in maps, 'libcuda mapped at import'\n"
        "print('ok')\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- the binding, success path -----------------------------------------------------------------


def test_success_path(fake: FakeCuda, driver: CudaDriver) -> None:
    assert driver.driver_version() == 12080  # before cuInit, as the real driver allows
    assert driver.describe() == f"CUDA 12.8 ({fake.path})"
    driver.init()
    assert fake.is_initialized()
    assert driver.device_count() == 2
    dev0, dev1 = driver.device(0), driver.device(1)
    assert (dev0, dev1) == (0, 1)
    assert driver.device_name(dev0) == "Fake CUDA Device 0"
    assert driver.device_name(dev1) == "Fake CUDA Device 1"
    assert driver.device_memory(dev1) == 32 << 30  # past 32 bits: size_t, not int
    assert driver.compute_capability(dev1) == (9, 1)
    assert driver.device_uuid(dev0) == UUID_0
    assert driver.device_uuid(dev1) == UUID_1
    assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", UUID_0)
    assert driver.error_name(101) == "CUDA_ERROR_INVALID_DEVICE"
    assert driver.error_string(101) == "invalid device ordinal"
    assert driver.error_name(0) == "CUDA_SUCCESS"


def test_versioned_symbols_are_preferred(fake: FakeCuda, driver: CudaDriver) -> None:
    assert driver.symbols["cuDeviceGetUuid_v2"] == "cuDeviceGetUuid_v2"
    assert driver.symbols[RELEASE] == RELEASE
    assert driver.symbols[RESET] == RESET
    driver.init()
    fake.set_refcount(1, 2)
    driver.device_uuid(1)
    driver.primary_ctx_release(1)
    driver.primary_ctx_reset(1)
    assert [fake.calls(name) for name in ("cuDeviceGetUuid_v2", RELEASE, RESET)] == [1, 1, 1]
    assert [fake.calls(n) for n in ("cuDeviceGetUuid", "cuDevicePrimaryCtxRelease")] == [0, 0]
    assert fake.calls("cuDevicePrimaryCtxReset") == 0


def test_driver_version_formats(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_driver_version(11040)
    assert driver.driver_version() == 11040
    assert driver.describe().startswith("CUDA 11.4 (")


def test_init_is_idempotent(fake: FakeCuda, driver: CudaDriver) -> None:
    driver.init()
    driver.init()
    assert fake.calls("cuInit") == 1


def test_primary_context_state_release_and_reset(fake: FakeCuda, driver: CudaDriver) -> None:
    driver.init()
    fake.set_flags(1, 0x9)
    fake.set_refcount(1, 2)
    assert driver.primary_ctx_state(1) == (0x9, True)
    assert driver.primary_ctx_state(0) == (0, False)
    driver.primary_ctx_release(1)
    assert fake.refcount(1) == 1
    assert driver.primary_ctx_state(1) == (0x9, True)
    driver.primary_ctx_reset(1)
    assert fake.refcount(1) == 0
    assert driver.primary_ctx_state(1) == (0x9, False)


def test_handles_are_not_ordinals(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_handle_base(100)
    driver.init()
    assert driver.device(1) == 101
    assert driver.device_uuid(101) == UUID_1
    with pytest.raises(CudaDriverError) as info:
        driver.device_name(1)  # an ordinal where a handle belongs
    assert (info.value.code, info.value.name) == (101, "CUDA_ERROR_INVALID_DEVICE")


# -- the binding, errors --------------------------------------------------------------------


def test_calls_before_init_fail_with_not_initialized(driver: CudaDriver) -> None:
    with pytest.raises(CudaDriverError) as info:
        driver.device_count()
    err = info.value
    assert (err.function, err.code) == ("cuDeviceGetCount", 3)
    assert (err.name, err.text) == ("CUDA_ERROR_NOT_INITIALIZED", "initialization error")


def test_init_without_devices_fails(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(0)
    with pytest.raises(CudaDriverError) as info:
        driver.init()
    err = info.value
    assert (err.function, err.code, err.name) == ("cuInit", 100, "CUDA_ERROR_NO_DEVICE")
    assert err.text == "no CUDA-capable device is detected"
    assert (
        str(err) == "cuInit failed: CUDA_ERROR_NO_DEVICE (100): no CUDA-capable device is detected"
    )


def test_init_failure_is_not_cached(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_error("cuInit", 999, count=1)
    with pytest.raises(CudaDriverError) as info:
        driver.init()
    assert (info.value.code, info.value.name, info.value.text) == (
        999,
        "CUDA_ERROR_UNKNOWN",
        "unknown error",
    )
    driver.init()  # the error was one-shot: this call reaches cuInit again and succeeds
    driver.init()  # and this one does not call it at all
    assert fake.calls("cuInit") == 2
    assert driver.device_count() == 2


ERROR_NAMES = {
    1: ("CUDA_ERROR_INVALID_VALUE", "invalid argument"),
    2: ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
    4: ("CUDA_ERROR_DEINITIALIZED", "driver shutting down"),
    46: ("CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"),
    101: ("CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
    201: ("CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
    304: ("CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"),
    999: ("CUDA_ERROR_UNKNOWN", "unknown error"),
}

CALLS: list[tuple[str, Callable[[CudaDriver], object]]] = [
    ("cuInit", lambda d: d.init()),
    ("cuDriverGetVersion", lambda d: d.driver_version()),
    ("cuDeviceGetCount", lambda d: d.device_count()),
    ("cuDeviceGet", lambda d: d.device(1)),
    ("cuDeviceGetName", lambda d: d.device_name(1)),
    ("cuDeviceGetUuid_v2", lambda d: d.device_uuid(1)),
    (GET_STATE, lambda d: d.primary_ctx_state(1)),
    (RELEASE, lambda d: d.primary_ctx_release(1)),
    (RESET, lambda d: d.primary_ctx_reset(1)),
]


@pytest.mark.parametrize("code", sorted(ERROR_NAMES))
@pytest.mark.parametrize(("symbol", "call"), CALLS, ids=[symbol for symbol, _ in CALLS])
def test_every_error_becomes_cuda_driver_error(
    fake: FakeCuda,
    driver: CudaDriver,
    symbol: str,
    call: Callable[[CudaDriver], object],
    code: int,
) -> None:
    if symbol != "cuInit":
        driver.init()
    fake.set_refcount(1, 1)
    fake.set_error(symbol, code)
    with pytest.raises(CudaDriverError) as info:
        call(driver)
    err = info.value
    assert (err.function, err.code, err.name, err.text) == (symbol, code, *ERROR_NAMES[code])
    assert fake.refcount(1) == 1  # the failed call changed nothing
    call_count = fake.calls(symbol)
    with pytest.raises(CudaDriverError):
        call(driver)  # count=-1: the error stays
    assert fake.calls(symbol) == call_count + 1


def test_unknown_code_gets_fallback_name_and_text(fake: FakeCuda, driver: CudaDriver) -> None:
    driver.init()
    fake.set_error("cuDeviceGetCount", 12345)
    with pytest.raises(CudaDriverError) as info:
        driver.device_count()
    err = info.value
    assert (err.code, err.name, err.text) == (
        12345,
        "CUDA_ERROR_UNKNOWN",
        "unknown error (code 12345)",
    )
    assert driver.error_name(12345) == "CUDA_ERROR_UNKNOWN"
    assert driver.error_string(2**40) == f"unknown error (code {2**40})"  # not even a C int


def test_failing_error_name_lookup_falls_back(fake: FakeCuda, driver: CudaDriver) -> None:
    driver.init()
    fake.set_error("cuGetErrorName", 1)
    fake.set_error("cuDeviceGet", 101)
    with pytest.raises(CudaDriverError) as info:
        driver.device(0)
    err = info.value
    assert (err.code, err.name, err.text) == (101, "CUDA_ERROR_UNKNOWN", "invalid device ordinal")
    assert fake.calls("cuGetErrorName") == 1


def test_without_error_functions_errors_still_raise(variant: Variant) -> None:
    fake, driver = variant("OMIT_cuGetErrorName", "OMIT_cuGetErrorString")
    assert driver.symbols["cuGetErrorName"] is None
    assert driver.symbols["cuGetErrorString"] is None
    with pytest.raises(CudaDriverError) as info:
        driver.device_count()  # before cuInit
    err = info.value
    assert (err.function, err.code) == ("cuDeviceGetCount", 3)
    assert (err.name, err.text) == ("CUDA_ERROR_UNKNOWN", "unknown error (code 3)")
    assert fake.calls("cuDeviceGetCount") == 1


# -- missing symbols and the _v2 fallback ---------------------------------------------------


def test_missing_symbol_raises_when_called(variant: Variant) -> None:
    fake, driver = variant("OMIT_cuDeviceGetName")
    assert driver.symbols["cuDeviceGetName"] is None
    driver.init()
    assert driver.device_count() == 2  # the rest of the library is usable
    with pytest.raises(CudaDriverError) as info:
        driver.device_name(0)
    err = info.value
    assert (err.function, err.code, err.name) == ("cuDeviceGetName", -1, SYMBOL_NOT_FOUND)
    assert err.text == f"{fake.path} does not export cuDeviceGetName"


def test_missing_cuinit_fails_release_stale_contexts(variant: Variant) -> None:
    _, driver = variant("OMIT_cuInit")
    with pytest.raises(CudaDriverError) as info:
        release_stale_contexts(driver, 0)
    assert (info.value.function, info.value.code) == ("cuInit", -1)
    assert info.value.name == SYMBOL_NOT_FOUND


def test_v2_symbols_fall_back_to_unversioned(variant: Variant) -> None:
    fake, driver = variant(
        "OMIT_cuDeviceGetUuid_v2",
        "OMIT_cuDevicePrimaryCtxRelease_v2",
        "OMIT_cuDevicePrimaryCtxReset_v2",
    )
    assert driver.symbols["cuDeviceGetUuid_v2"] == "cuDeviceGetUuid"
    assert driver.symbols[RELEASE] == "cuDevicePrimaryCtxRelease"
    assert driver.symbols[RESET] == "cuDevicePrimaryCtxReset"
    fake.set_device_count(3)
    fake.set_active(1)
    fake.set_refcount(2, 2)
    active, actions = release_stale_contexts(driver, 0, policy="reset")
    assert active == [1, 2]
    assert [(a.device, a.uuid, a.action) for a in actions] == [
        (1, UUID_1, "released"),
        (2, UUID_2, "reset"),
    ]
    assert fake.calls("cuDeviceGetUuid") == 2
    assert fake.calls("cuDevicePrimaryCtxRelease") == 2
    assert fake.calls("cuDevicePrimaryCtxReset") == 1


def test_fallback_symbol_is_named_in_errors(variant: Variant) -> None:
    fake, driver = variant("OMIT_cuDevicePrimaryCtxRelease_v2")
    driver.init()
    fake.set_error("cuDevicePrimaryCtxRelease", 201)
    with pytest.raises(CudaDriverError) as info:
        driver.primary_ctx_release(1)
    assert (info.value.function, info.value.code) == ("cuDevicePrimaryCtxRelease", 201)


def test_no_release_symbol_at_all_is_a_reported_error(variant: Variant) -> None:
    fake, driver = variant("OMIT_cuDevicePrimaryCtxRelease_v2", "OMIT_cuDevicePrimaryCtxRelease")
    assert driver.symbols[RELEASE] is None
    fake.set_active(1)
    active, actions = release_stale_contexts(driver, 0)
    assert active == [1]
    assert actions == [
        ContextAction(
            device=1,
            uuid=UUID_1,
            action="error",
            result=SYMBOL_NOT_FOUND,
            detail=f"{RELEASE} returned SYMBOL_NOT_FOUND (-1): {fake.path} does not export "
            f"{RELEASE} (nor cuDevicePrimaryCtxRelease)",
        )
    ]
    assert fake.refcount(1) == 1


# -- release_stale_contexts -----------------------------------------------------------------


def test_releases_foreign_contexts(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(4)
    fake.set_active(1)
    fake.set_active(3)
    active, actions = release_stale_contexts(driver, 0)
    assert active == [1, 3]
    assert actions == [
        ContextAction(device=1, uuid=UUID_1, action="released", result="CUDA_SUCCESS"),
        ContextAction(device=3, uuid=UUID_3, action="released", result="CUDA_SUCCESS"),
    ]
    assert [fake.refcount(d) for d in range(4)] == [0, 0, 0, 0]
    assert fake.calls(RELEASE) == 2
    assert fake.calls(RESET) == 0


def test_nothing_active_means_nothing_done(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(3)
    assert release_stale_contexts(driver, 0) == ([], [])
    assert fake.calls(GET_STATE) == 2
    assert fake.calls(RELEASE) == 0


def test_own_device_is_never_touched(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(3)
    for dev in range(3):
        fake.set_active(dev)
    active, actions = release_stale_contexts(driver, 1, policy="reset")
    assert active == [0, 2]
    assert [(a.device, a.action) for a in actions] == [(0, "released"), (2, "released")]
    assert fake.device_calls(1) == 0
    assert fake.refcount(1) == 1


def test_context_retained_elsewhere_is_released_once(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_refcount(1, 2)
    active, actions = release_stale_contexts(driver, 0)
    assert active == [1]
    assert len(actions) == 1
    assert (actions[0].action, actions[0].result) == ("retained_elsewhere", "CUDA_SUCCESS")
    assert "another owner" in actions[0].detail
    assert fake.calls(RELEASE) == 1
    assert fake.calls(RESET) == 0
    assert fake.refcount(1) == 1


def test_policy_reset_resets_a_context_retained_elsewhere(
    fake: FakeCuda, driver: CudaDriver
) -> None:
    fake.set_refcount(1, 3)
    active, actions = release_stale_contexts(driver, 0, policy="reset")
    assert active == [1]
    assert [(a.device, a.uuid, a.action, a.result) for a in actions] == [
        (1, UUID_1, "reset", "CUDA_SUCCESS")
    ]
    assert fake.calls(RELEASE) == 1
    assert fake.calls(RESET) == 1
    assert fake.refcount(1) == 0


def test_policy_reset_does_not_reset_what_release_freed(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_active(1)
    _, actions = release_stale_contexts(driver, 0, policy="reset")
    assert [a.action for a in actions] == ["released"]
    assert fake.calls(RESET) == 0


def test_failing_reset_is_reported(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_refcount(1, 2)
    fake.set_error(RESET, 999)
    active, actions = release_stale_contexts(driver, 0, policy="reset")
    assert active == [1]
    assert actions == [
        ContextAction(
            device=1,
            uuid=UUID_1,
            action="error",
            result="CUDA_ERROR_UNKNOWN",
            detail=f"{RESET} returned CUDA_ERROR_UNKNOWN (999): unknown error",
        )
    ]
    assert fake.refcount(1) == 1


def test_failing_release_on_one_device_does_not_stop_the_others(
    fake: FakeCuda, driver: CudaDriver
) -> None:
    fake.set_device_count(4)
    for dev in (1, 2, 3):
        fake.set_active(dev)
    fake.set_error(RELEASE, 201, device=2)
    active, actions = release_stale_contexts(driver, 0)
    assert active == [1, 2, 3]
    assert [(a.device, a.action, a.result) for a in actions] == [
        (1, "released", "CUDA_SUCCESS"),
        (2, "error", "CUDA_ERROR_INVALID_CONTEXT"),
        (3, "released", "CUDA_SUCCESS"),
    ]
    assert actions[1].detail == f"{RELEASE} returned CUDA_ERROR_INVALID_CONTEXT (201): " + (
        "invalid device context"
    )
    assert [fake.refcount(d) for d in (1, 2, 3)] == [0, 1, 0]
    assert fake.calls(RELEASE) == 3


def test_unreadable_state_is_reported_and_skipped(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(3)
    fake.set_active(1)
    fake.set_active(2)
    fake.set_error(GET_STATE, 101, device=1)
    active, actions = release_stale_contexts(driver, 0)
    assert active == [2]
    assert [(a.device, a.uuid, a.action, a.result) for a in actions] == [
        (1, "", "error", "CUDA_ERROR_INVALID_DEVICE"),
        (2, UUID_2, "released", "CUDA_SUCCESS"),
    ]
    assert fake.refcount(1) == 1


def test_device_lookup_failure_is_reported(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_active(1)
    fake.set_error("cuDeviceGet", 101, device=1)
    active, actions = release_stale_contexts(driver, 0)
    assert active == []
    assert [(a.device, a.action, a.result) for a in actions] == [
        (1, "error", "CUDA_ERROR_INVALID_DEVICE")
    ]
    assert fake.calls(RELEASE) == 0


def test_unknown_uuid_does_not_prevent_release(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_active(1)
    fake.set_error("cuDeviceGetUuid_v2", 999)
    _, actions = release_stale_contexts(driver, 0)
    assert actions == [ContextAction(device=1, uuid="", action="released", result="CUDA_SUCCESS")]


def test_context_with_allocations_is_not_released(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(3)
    fake.set_active(1)
    fake.set_active(2)
    asked: list[int] = []

    def allocated(ordinal: int) -> int:
        asked.append(ordinal)
        return {1: 4096}.get(ordinal, 0)

    active, actions = release_stale_contexts(driver, 0, allocated_bytes=allocated)
    assert active == [1, 2]
    assert asked == [1, 2]
    assert [(a.device, a.action, a.result) for a in actions] == [
        (1, "in_use", ""),
        (2, "released", "CUDA_SUCCESS"),
    ]
    assert "4096 bytes" in actions[0].detail
    assert actions[0].uuid == UUID_1
    assert fake.calls(RELEASE) == 1  # only device 2
    assert fake.refcount(1) == 1


def test_failing_allocated_bytes_means_no_release(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_active(1)

    def broken(ordinal: int) -> int:
        raise RuntimeError("allocator unavailable")

    _, actions = release_stale_contexts(driver, 0, allocated_bytes=broken)
    assert [(a.device, a.action, a.result) for a in actions] == [(1, "error", "")]
    assert actions[0].detail == "not released: allocated_bytes(1) raised RuntimeError: " + (
        "allocator unavailable"
    )
    assert fake.calls(RELEASE) == 0


def test_policy_off_only_reports(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_device_count(3)
    fake.set_active(1)
    fake.set_refcount(2, 2)
    asked: list[int] = []

    def allocated(ordinal: int) -> int:
        asked.append(ordinal)
        return 0

    active, actions = release_stale_contexts(driver, 0, policy="off", allocated_bytes=allocated)
    assert active == [1, 2]
    assert [(a.device, a.uuid, a.action, a.result) for a in actions] == [
        (1, UUID_1, "left_active", ""),
        (2, UUID_2, "left_active", ""),
    ]
    assert asked == []
    assert fake.calls(RELEASE) + fake.calls(RESET) == 0
    assert [fake.refcount(d) for d in range(3)] == [0, 1, 2]


def test_invalid_policy_is_rejected_before_any_call(fake: FakeCuda, driver: CudaDriver) -> None:
    with pytest.raises(ValueError, match="'releases'"):
        release_stale_contexts(driver, 0, policy="releases")
    assert fake.calls("cuInit") == 0


def test_reports_ordinals_not_handles(fake: FakeCuda, driver: CudaDriver) -> None:
    fake.set_handle_base(40)
    fake.set_device_count(3)
    fake.set_active(2)
    active, actions = release_stale_contexts(driver, 1)
    assert active == [2]
    assert [(a.device, a.uuid, a.action) for a in actions] == [(2, UUID_2, "released")]
    assert fake.refcount(2) == 0
    assert fake.device_calls(1) == 0


@pytest.mark.parametrize(("symbol", "code"), [("cuInit", 100), ("cuDeviceGetCount", 999)])
def test_init_and_count_failures_raise(
    fake: FakeCuda, driver: CudaDriver, symbol: str, code: int
) -> None:
    fake.set_active(1)
    fake.set_error(symbol, code)
    with pytest.raises(CudaDriverError) as info:
        release_stale_contexts(driver, 0)
    assert (info.value.function, info.value.code) == (symbol, code)
    assert fake.calls(RELEASE) == 0


# -- reports ----------------------------------------------------------------------------------


def test_device_report_round_trips_and_is_frozen() -> None:
    action = ContextAction(device=1, uuid=UUID_1, action="released", result="CUDA_SUCCESS")
    report = DeviceReport(
        rank=2,
        device="cuda:0",
        ordinal=0,
        driver="CUDA 12.8 (libcuda.so.1)",
        active_before=[1],
        actions=[action],
        elapsed_ms=1.5,
    )
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(report), type=DeviceReport)
    assert decoded == report
    assert decoded.actions[0].action == "released"
    assert decoded.foreign_mib == {}
    assert decoded.freed_mib is None
    with pytest.raises(AttributeError):
        report.rank = 3  # type: ignore[misc]


def test_device_report_defaults_are_not_shared() -> None:
    first = DeviceReport(rank=0, device="cpu", ordinal=None)
    second = DeviceReport(rank=1, device="cpu", ordinal=None)
    first.warnings.append("x")
    assert second.warnings == []
    assert (first.uuid, first.driver, first.elapsed_ms) == ("", "", 0.0)


def test_unknown_action_is_rejected_on_decode() -> None:
    raw = msgspec.json.encode(
        {"device": 1, "uuid": "", "action": "freed", "result": "", "detail": ""}
    )
    with pytest.raises(msgspec.ValidationError, match="action"):
        msgspec.json.decode(raw, type=ContextAction)


# --- device selection without a GPU: the environment a worker gets -------------------

def _spec(gpu: int, isolate: bool) -> object:
    from gpuexec.ipc.messages import WorkerSpec

    return WorkerSpec(rank=gpu, local_rank=gpu, world_size=4, local_world_size=4,
                      device="cuda", gpu=gpu, isolate_devices=isolate,
                      stale_context_policy="release", driver_pid=1, driver_is_parent=True,
                      req_endpoint="", rep_endpoint="", worker_cls="m:C")


@pytest.mark.parametrize("parent,gpu,expected", [
    (None, 1, "1"), ("3,5,7", 1, "5"), ("GPU-aaa,GPU-bbb", 0, "GPU-aaa"), (" 2 , 6 ", 1, "6"),
])
def test_isolate_devices_respects_the_drivers_cuda_visible_devices(
        parent: str | None, gpu: int, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuexec.worker.device import isolate_environment, torch_device

    if parent is None:  # set first, so that monkeypatch undoes what the test writes
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    spec = _spec(gpu, isolate=True)
    isolate_environment(spec)  # type: ignore[arg-type]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
    assert torch_device(spec) == "cuda:0"  # type: ignore[arg-type]


def test_all_visible_keeps_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuexec.worker.device import isolate_environment, torch_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec = _spec(1, isolate=False)
    isolate_environment(spec)  # type: ignore[arg-type]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert torch_device(spec) == "cuda:1"  # type: ignore[arg-type]
