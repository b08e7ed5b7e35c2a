"""numpy arrays and CPU tensors: out of band on the wire, intact on arrival."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from workers import EchoWorker

from gpuexec import Executor
from gpuexec.errors import ValueNotCarriedError
from gpuexec.ipc.codec import INLINE_LIMIT, Decoder, Encoder, MalformedMessage, UndecodableValue
from gpuexec.ipc.messages import Call, Reply, ToWorker

NP_DTYPES = ["bool", "int8", "uint8", "int16", "int32", "int64", "uint64", "float16",
             "float32", "float64", "complex64", "complex128", ">i4", "datetime64[ns]"]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@pytest.fixture(scope="module", params=["zmq", "shm"])
def ex(request: pytest.FixtureRequest) -> Iterator[Executor]:
    with Executor(EchoWorker, 2, device="cpu", start_method="fork",
                  transport=request.param) as executor:
        yield executor


def _roundtrip(ex: Executor, value: Any) -> list[Any]:
    return ex.collective_rpc(lambda w, v: v, args=(value,))


@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_numpy_dtypes_roundtrip(ex: Executor, dtype: str) -> None:
    rng = np.random.default_rng(7)
    a = (rng.integers(0, 100, size=(64, 33)) % (2 if dtype == "bool" else 100)).astype(dtype)
    for got in _roundtrip(ex, a):
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


def test_numpy_non_contiguous_and_odd_shapes(ex: Executor) -> None:
    base = np.arange(4 * 1024 * 1024, dtype=np.float32).reshape(2048, 2048)  # 16 MiB
    for a in (base[:, ::3], base.T, base[::2, 5:], np.float64(3.5) * np.ones(()),
              np.zeros((0, 7), np.int16), np.ones((1,), np.uint8)):
        got = _roundtrip(ex, a)[1]
        assert got.shape == a.shape and got.dtype == a.dtype
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, a)


def test_received_arrays_are_writable(ex: Executor) -> None:
    a = np.arange(3 * 1024 * 1024, dtype=np.uint8)  # 3 MiB
    got = ex.collective_rpc(lambda w, v: (v.__setitem__(0, 9), int(v[0]))[1], args=(a,))
    assert got == [9, 9]
    assert a[0] == 0  # the caller's array is untouched
    back = _roundtrip(ex, a)[0]
    back[0] = 1
    assert back[0] == 1


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_dtypes_roundtrip(ex: Executor, dtype: torch.dtype) -> None:
    t = (torch.arange(5000, dtype=torch.float64) % 97).reshape(50, 100).to(dtype)
    for got in _roundtrip(ex, t):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == dtype and got.shape == t.shape
        assert torch.equal(got, t)


def test_torch_views_grad_and_big(ex: Executor) -> None:
    big = torch.randn(1024, 1024)  # 4 MiB
    for t in (big[:, 1::2], big.T, torch.tensor(2.5), torch.empty(0, 3),
              torch.ones(3, requires_grad=True), torch.tensor([1 + 2j]).conj()):
        got = _roundtrip(ex, t)[0]
        assert got.shape == t.shape and got.dtype == t.dtype
        assert torch.equal(got, t.detach().resolve_conj())


def test_arrays_in_return_values_and_nesting(ex: Executor) -> None:
    out = ex.collective_rpc(lambda w: {"a": np.full((600, 600), w.rank, np.int32),
                                       "t": [torch.full((2, 2), float(w.rank))]})
    for rank, item in enumerate(out):
        assert item["a"].sum() == rank * 360000
        assert torch.equal(item["t"][0], torch.full((2, 2), float(rank)))


def test_big_arrays_travel_out_of_band() -> None:
    enc = Encoder(allow_pickle=False)
    a = np.ones((1024, 1024), np.float32)  # 4 MiB
    t = torch.ones(256, 256, dtype=torch.bfloat16)
    frames = enc.encode(Reply(1, 0, {"a": a, "t": t}))
    assert len(frames) == 3
    assert len(frames[0]) < 200  # the header holds metadata only
    assert memoryview(frames[1]).nbytes == a.nbytes
    assert memoryview(frames[2]).nbytes == t.numel() * 2
    small = enc.encode(Reply(1, 0, np.ones(INLINE_LIMIT // 8 - 1)))
    assert len(small) == 1  # small arrays are cheaper inline
    dec: Decoder[Reply] = Decoder(Reply, allow_pickle=False)
    back = dec.decode(frames).value
    np.testing.assert_array_equal(back["a"], a)
    assert torch.equal(back["t"], t)


def test_malformed_frames_raise_malformed_message() -> None:
    dec: Decoder[Any] = Decoder(ToWorker, allow_pickle=False)
    good = Encoder(allow_pickle=False).encode(Call(1, "m", None, [np.ones(2048)], {}))
    bad_cases = [
        [],
        [b"\xc1"],                                        # invalid msgpack
        [msgspec.msgpack.encode({"type": "nope"})],       # unknown tag
        [good[0]],                                        # array frame missing
        [msgspec.msgpack.encode(["call", "x"])],          # wrong field types
        [msgspec.msgpack.encode(msgspec.msgpack.Ext(3, b"cos\nsystem\n"))],  # pickle
        [msgspec.msgpack.encode(msgspec.msgpack.Ext(42, b""))],
    ]
    for frames in bad_cases:
        with pytest.raises(MalformedMessage):
            dec.decode(frames)
    assert isinstance(dec.decode(good), Call)


def test_pickle_needs_allow_pickle() -> None:
    value = Fraction(1, 3)
    with pytest.raises(ValueNotCarriedError, match="needs pickle") as info:
        Encoder(allow_pickle=False).encode(Reply(1, 0, value))
    assert (info.value.path, info.value.type_name) == ("result", "fractions.Fraction")
    frames = Encoder(allow_pickle=True).encode(Reply(1, 0, value))
    with pytest.raises(UndecodableValue, match="pickle") as refused:
        Decoder(Reply, allow_pickle=False).decode(frames)
    assert refused.value.reason == "pickle_refused"
    assert refused.value.envelope.call_id == 1  # the call can be answered with the error
    assert Decoder(Reply, allow_pickle=True).decode(frames).value == value


def test_containers_keep_their_type_and_objects_are_pickled(ex: Executor) -> None:
    assert _roundtrip(ex, (1, (2, 3)))[0] == (1, (2, 3))
    assert _roundtrip(ex, {1, 2})[0] == {1, 2}
    assert _roundtrip(ex, Fraction(2, 7))[0] == Fraction(2, 7)
    assert _roundtrip(ex, np.float32(1.5))[0] == np.float32(1.5)
