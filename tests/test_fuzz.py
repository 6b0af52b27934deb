"""Fuzzing the CIFAR-10 batch reader: byte flips, truncations, insertions and deletions of a real
(50-image) batch file only ever give a valid dataset or a `DataError`, and never hang."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from c40.data import CIFAR10_CLASSES, read_batch
from c40.errors import DataError
from conftest import write_batch

N = 50


@pytest.fixture(scope="module")
def batch_bytes(cifar_dir) -> bytes:
    images, labels = read_batch(cifar_dir / "test_batch")
    chw = images[:N].transpose(0, 3, 1, 2).reshape(N, -1)  # NHWC -> CHW rows
    with tempfile.TemporaryDirectory() as d:
        return write_batch(Path(d) / "b", chw, labels[:N]).read_bytes()


# The pixels are one 153,600-byte blob in the middle; the pickle structure (opcodes, lengths,
# keys, labels, dtype, shape) sits in the first ~300 and last ~800 bytes, so positions are drawn
# mostly there, as fractions of the length (the length is only known inside the test).
_position = st.one_of(st.integers(0, 400).map(lambda i: ("head", i)),
                      st.integers(0, 1200).map(lambda i: ("tail", i)),
                      st.floats(0, 1, exclude_max=True).map(lambda f: ("any", f)))
_mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                      _position, st.binary(min_size=1, max_size=8), st.integers(0, 7))


def _offset(where: tuple, size: int) -> int:
    kind, v = where
    if kind == "head":
        return min(v, size - 1)
    if kind == "tail":
        return max(0, size - 1 - v)
    return int(v * size)


def _mutate(raw: bytes, mutations: list) -> bytes:
    b = bytearray(raw)
    for op, where, payload, bit in mutations:
        if not b:
            break
        i = _offset(where, len(b))
        if op == "flip":
            b[i] ^= 1 << bit
        elif op == "set":
            b[i:i + len(payload)] = payload
        elif op == "insert":
            b[i:i] = payload
        elif op == "delete":
            del b[i:i + 1 + bit]
        else:
            del b[i:]
    return bytes(b)


@settings(max_examples=200, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_batch_is_valid_or_a_data_error(batch_bytes, tmp_path, mutations):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_mutate(batch_bytes, mutations))
    try:
        images, labels = read_batch(path)
    except DataError as e:
        event("DataError")
        assert str(path) in str(e) and "\n" not in str(e).strip()  # one line, naming the file
        return
    event("valid")
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    assert len(labels) == 0 or 0 <= labels.min() <= labels.max() < len(CIFAR10_CLASSES)


def test_the_unmutated_batch_reads(batch_bytes, tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(batch_bytes)
    images, labels = read_batch(path)
    assert images.shape == (N, 32, 32, 3) and len(labels) == N and os.path.getsize(path) > 150_000
