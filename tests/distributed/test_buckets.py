"""Length bucketing and input order, without Ray: exact expected batches, every row exactly once."""

from __future__ import annotations

import random

import pytest

from pipo.distributed.buckets import InputOrder, length_buckets


def test_equal_lengths_fill_whole_batches_and_the_rest_is_batched_by_length():
    lengths = [5, 9, 5, 2, 5, 9, 5, 7]
    # length 5 fills one batch of 4 (rows 0 2 4 6); 9 9 7 2 are left over; longest first
    assert length_buckets(lengths, 4) == [[1, 5, 7, 3], [0, 2, 4, 6]]
    assert length_buckets(lengths, 2) == [[1, 5], [7, 3], [0, 2], [4, 6]]


def test_every_batch_is_full_but_the_last_which_holds_the_shortest_leftovers():
    lengths = [30, 1, 30, 30, 2, 8, 8]
    batches = length_buckets(lengths, 3)
    assert batches == [[0, 2, 3], [5, 6, 4], [1]]


def test_full_batches_go_longest_first():
    lengths = [1, 1, 50, 50, 9, 9]
    assert length_buckets(lengths, 2) == [[2, 3], [4, 5], [0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_random_lengths_cover_every_row_once_and_only_the_last_batch_is_short(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([3, 4, 5, 40, 200]) for _ in range(rng.randint(1, 60))]
    batch_size = rng.randint(1, 9)
    batches = length_buckets(lengths, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    assert len(batches) == -(-len(lengths) // batch_size)  # as many batches as input order makes
    padded = sum(max(lengths[i] for i in b) - lengths[i] for b in batches for i in b)
    in_order = [list(range(s, min(s + batch_size, len(lengths))))
                for s in range(0, len(lengths), batch_size)]
    assert padded <= sum(max(lengths[i] for i in b) - lengths[i] for b in in_order for i in b)


def test_rows_are_released_in_input_order_once_every_earlier_row_is_in():
    order = InputOrder(4)
    assert order.add(2, "c") == [] and order.add(0, "a") == ["a"]
    assert order.add(1, "b") == ["b", "c"] and not order.complete
    assert order.add(3, "d") == ["d"] and order.complete


@pytest.mark.parametrize("index", [0, 1, 5, -1])
def test_a_row_seen_twice_or_unknown_is_refused(index):
    order = InputOrder(3)
    order.add(0, "a")
    order.add(1, "b")
    with pytest.raises(ValueError, match="twice" if index in (0, 1) else "not one of"):
        order.add(index, "x")
