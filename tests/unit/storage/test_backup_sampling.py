"""The sampled drill's statistics and the bounded pool of the backup walks (no I/O)."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator

import pytest

from storage.backup.pool import MAX_WORKERS, bounded_map, check_workers
from storage.backup.sampling import (
    SamplePlan,
    check_plan,
    choose,
    parse_seed,
    rank,
    sample_size,
    selection_digest,
)
from storage.errors import InvalidRecordError


@pytest.mark.parametrize(
    ("confidence", "rate", "n"),
    [(0.99, 0.01, 459), (0.95, 0.05, 59), (0.999, 0.001, 6905), (0.75, 0.5, 2), (0.5, 0.5, 1)],
)
def test_sample_size_is_the_smallest_that_reaches_the_confidence(
    confidence: float, rate: float, n: int
) -> None:
    assert sample_size(confidence, rate) == n
    assert (1 - rate) ** n <= 1 - confidence  # n records find a defect with confidence c
    assert (1 - rate) ** (n - 1) > 1 - confidence  # and n - 1 would not


@pytest.mark.parametrize(
    ("confidence", "rate", "field"),
    [(1.0, 0.01, "sample_confidence"), (0.3, 0.01, "sample_confidence"),
     (math.nan, 0.01, "sample_confidence"), (0.99, 0.0, "max_defect_rate"),
     (0.99, 1.0, "max_defect_rate"), (0.99, math.nan, "max_defect_rate")],
)  # fmt: skip
def test_bad_plans_are_refused_naming_the_field(confidence: float, rate: float, field: str) -> None:
    with pytest.raises(InvalidRecordError) as caught:
        check_plan(confidence, rate)
    assert caught.value.field == field


def test_seed_parsing() -> None:
    assert parse_seed("00ff") == b"\x00\xff"
    assert len(parse_seed("")) == 16
    assert parse_seed("") != parse_seed("")
    for bad in ("xyz", "0", "00" * 33):
        with pytest.raises(InvalidRecordError, match="seed"):
            parse_seed(bad)


def test_the_sample_depends_on_the_seed_only_not_on_row_order() -> None:
    keys = [(f"rec-{i:04d}", v) for i in range(300) for v in (1, 2)]
    seed = bytes(range(16))
    first = choose(seed, keys, 25)
    shuffled = list(keys)
    random.Random(7).shuffle(shuffled)
    assert choose(seed, shuffled, 25) == first
    assert first == sorted(first)
    assert len(set(first)) == 25
    assert first == sorted(sorted(keys, key=lambda k: rank(seed, k))[:25])
    assert choose(b"another seed", keys, 25) != first
    assert selection_digest(first) == selection_digest(choose(seed, iter(shuffled), 25))
    # Extra columns ride along; a sample larger than the population takes everything.
    wide = [(i, v, f"objects/{i}") for i, v in keys]
    assert [(i, v) for i, v, _ in choose(seed, wide, 25)] == first
    assert len(choose(seed, keys, 10_000)) == len(keys)
    assert SamplePlan(0.99, 0.01, seed).size == 459


def test_bounded_map_keeps_order_and_bounds_what_is_in_flight() -> None:
    started: list[int] = []
    lock = threading.Lock()
    gate = threading.Event()

    def items() -> Iterator[int]:
        yield from range(50)

    def work(n: int) -> int:
        with lock:
            started.append(n)
        gate.wait(5)
        return n * n

    results = bounded_map(work, items(), 3)
    gate.set()
    assert list(results) == [n * n for n in range(50)]
    assert sorted(started) == list(range(50))


def test_bounded_map_never_submits_more_than_twice_the_workers_ahead() -> None:
    pulled: list[int] = []

    def items() -> Iterator[int]:
        for n in range(100):
            pulled.append(n)
            yield n

    results = bounded_map(lambda n: n, items(), 2)
    assert next(results) == 0
    assert len(pulled) <= 2 * 2  # the window, not the whole input
    results.close()  # early close: the rest is never pulled
    assert len(pulled) <= 4


def test_bounded_map_raises_the_work_error_at_its_place() -> None:
    def work(n: int) -> int:
        if n == 3:
            raise ValueError("item 3")
        return n

    results = bounded_map(work, range(10), 2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3"):
        next(results)


def test_worker_counts_are_checked() -> None:
    assert check_workers(1) == 1
    assert check_workers(MAX_WORKERS) == MAX_WORKERS
    for bad in (0, -1, MAX_WORKERS + 1):
        with pytest.raises(ValueError, match="workers"):
            check_workers(bad)
