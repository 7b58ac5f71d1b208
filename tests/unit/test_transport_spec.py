"""A data mover's task as it crosses the process boundary: every CBT area, in bounded form."""
from __future__ import annotations

import random

import pytest

from vbrd.models import Extent
from vbrd.transport.spec import (
    MAX_AREAS,
    MAX_TASK_BYTES,
    TASK_HEADER,
    bounded_areas,
    decode_areas,
    encode_areas,
    encode_task,
)


def test_200_000_areas_travel_whole_in_one_length_prefixed_task() -> None:
    rnd = random.Random(7)
    areas = [Extent(n * 1024 + rnd.randrange(512), rnd.randrange(1, 512))
             for n in range(200_000)]
    text = encode_areas(areas)
    assert decode_areas(text) == areas
    assert len(text) == (16 * len(areas) + 2) // 3 * 4
    task = encode_task({"spec": {"areas": text}})
    (length,) = TASK_HEADER.unpack_from(task)
    assert length == len(task) - TASK_HEADER.size and length > 1 << 20


def test_areas_that_are_not_the_compact_form_or_too_many_are_refused() -> None:
    with pytest.raises(ValueError, match="base64 string"):
        decode_areas([[0, 512]])
    with pytest.raises(ValueError, match="not valid base64"):
        decode_areas("not base64!")
    with pytest.raises(ValueError, match="whole number"):
        decode_areas("AAAA")
    with pytest.raises(ValueError, match=f"at most {MAX_AREAS} areas"):
        decode_areas("A" * (MAX_AREAS * 16 // 3 * 4 + 8))
    with pytest.raises(ValueError, match="more than"):
        encode_areas([Extent(2 * n, 1) for n in range(MAX_AREAS + 1)])
    with pytest.raises(ValueError, match="allowed"):
        encode_task({"blob": "x" * MAX_TASK_BYTES})


def test_bounded_areas_merges_and_joins_only_the_closest_neighbours_beyond_the_limit() -> None:
    areas = [Extent(100, 10), Extent(0, 10), Extent(5, 10), Extent(15, 5), Extent(40, 0),
             Extent(60, 10), Extent(71, 4), Extent(200, 1)]
    merged = [Extent(0, 20), Extent(60, 10), Extent(71, 4), Extent(100, 10), Extent(200, 1)]
    assert bounded_areas(areas) == merged
    assert bounded_areas(areas, 5) == merged
    # the gaps: 40, 1, 25, 90 — the smallest go first, and every changed byte stays covered
    assert bounded_areas(areas, 4) == [Extent(0, 20), Extent(60, 15), Extent(100, 10),
                                       Extent(200, 1)]
    assert bounded_areas(areas, 3) == [Extent(0, 20), Extent(60, 50), Extent(200, 1)]
    assert bounded_areas(areas, 1) == [Extent(0, 201)]
    with pytest.raises(ValueError):
        bounded_areas(areas, 0)
