"""The image history pool: fill phase, the 50/50 swap per image, seeding and state round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cyclegan.image_pool import ImagePool


def tagged(values: list[float]) -> torch.Tensor:
    """A batch in which image i is filled with ``values[i]``: an image's value is its identity."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2)


def tags(batch: torch.Tensor) -> list[float]:
    assert (batch == batch[:, :1, :1, :1]).all(), "an image is not one constant value"
    return batch[:, 0, 0, 0].tolist()


def stored_tags(pool: ImagePool) -> list[float]:
    return sorted(im[0, 0, 0].item() for im in pool.images)


def full_pool(size: int, seed: int) -> ImagePool:
    pool = ImagePool(size, seed)
    pool.query(tagged([float(-i - 1) for i in range(size)]))
    assert len(pool) == size
    return pool


def test_fill_phase_returns_inputs_and_stores_them():
    pool = ImagePool(10, seed=0)
    first = torch.randn(4, 3, 8, 8)
    out = pool.query(first)
    assert torch.equal(out, first)
    assert len(pool) == 4
    second = torch.randn(6, 3, 8, 8)
    assert torch.equal(pool.query(second), second)
    assert len(pool) == 10
    stored = torch.stack(pool.images)
    assert torch.equal(stored, torch.cat([first, second]))
    # The pool keeps copies: changing the caller's tensor later does not change the pool.
    first.zero_()
    assert torch.equal(torch.stack(pool.images[:4]), stored[:4])


def test_a_batch_larger_than_the_free_space_fills_then_swaps():
    pool = ImagePool(3, seed=0)
    out = pool.query(tagged([1, 2, 3, 4, 5, 6, 7, 8]))
    got = tags(out)
    assert got[:3] == [1, 2, 3]
    assert len(pool) == 3
    # Each later image is returned as it is or swapped for one the pool held at that moment.
    held = [1.0, 2.0, 3.0]
    for new, value in zip([4.0, 5.0, 6.0, 7.0, 8.0], got[3:], strict=True):
        if value != new:
            assert value in held
            held = [new if h == value else h for h in held]
    assert stored_tags(pool) == sorted(held)


def test_output_is_detached():
    pool = ImagePool(2, seed=0)
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    assert not pool.query(x * 2).requires_grad


def test_swaps_half_the_time_and_returns_previously_stored_images():
    size, draws = 50, 2000
    pool = full_pool(size, seed=0)
    shadow = stored_tags(pool)
    swapped = 0
    for j in range(draws):
        new = float(j)
        (got,) = tags(pool.query(tagged([new])))
        if got == new:
            # Returned as is: the pool is unchanged.
            assert stored_tags(pool) == shadow
        else:
            # An image the pool held is returned and the new one takes its place.
            swapped += 1
            assert got in shadow
            shadow.remove(got)
            shadow = sorted(shadow + [new])
            assert stored_tags(pool) == shadow
        assert len(pool) == size
    tolerance = 4 * math.sqrt(0.25 / draws)  # four binomial standard deviations
    assert abs(swapped / draws - 0.5) < tolerance


def test_replaced_slots_are_uniform():
    # Which stored image is swapped out is uniform over the pool.
    size, draws = 4, 4000
    pool = full_pool(size, seed=3)
    counts = dict.fromkeys(range(size), 0)
    for j in range(draws):
        before = [im[0, 0, 0].item() for im in pool.images]
        pool.query(tagged([float(j)]))
        after = [im[0, 0, 0].item() for im in pool.images]
        changed = [i for i in range(size) if before[i] != after[i]]
        assert len(changed) <= 1
        for i in changed:
            counts[i] += 1
    total = sum(counts.values())
    for c in counts.values():
        assert abs(c / total - 1 / size) < 4 * math.sqrt(0.25 * 0.75 / total)


def test_swaps_per_image_not_per_batch():
    pool = full_pool(50, seed=1)
    batches, mixed, swapped = 60, 0, 0
    for b in range(batches):
        new = [float(1000 * b + i) for i in range(8)]
        got = tags(pool.query(tagged(new)))
        is_swap = [g != n for g, n in zip(got, new, strict=True)]
        swapped += sum(is_swap)
        mixed += 0 < sum(is_swap) < 8
        # Images that are not swapped keep their place in the batch.
        for g, n, s in zip(got, new, is_swap, strict=True):
            assert s or g == n
    # A per-batch coin would give no mixed batches; per image, 254 of 256 outcomes are mixed.
    assert mixed >= 0.9 * batches
    assert abs(swapped / (8 * batches) - 0.5) < 4 * math.sqrt(0.25 / (8 * batches))


def test_size_zero_passes_the_batch_through():
    pool = ImagePool(0, seed=0)
    x = torch.randn(3, 3, 4, 4)
    out = pool.query(x)
    assert out is x
    assert len(pool) == 0
    assert torch.equal(pool.query(x), x)


def run_pool(pool: ImagePool, start: int, n: int) -> list[float]:
    out = []
    for j in range(start, start + n):
        out += tags(pool.query(tagged([float(j), float(j) + 0.5])))
    return out


def test_same_seed_gives_the_same_sequence():
    a, b, c = ImagePool(5, seed=11), ImagePool(5, seed=11), ImagePool(5, seed=12)
    seq_a, seq_b, seq_c = run_pool(a, 0, 200), run_pool(b, 0, 200), run_pool(c, 0, 200)
    assert seq_a == seq_b
    assert seq_a != seq_c


def test_pool_draws_do_not_touch_the_global_rng():
    pool = full_pool(5, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_pool(pool, 0, 20)
    assert torch.equal(torch.rand(3), expected)


def test_state_dict_round_trip_continues_the_same_sequence():
    original = ImagePool(6, seed=5)
    run_pool(original, 0, 40)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = ImagePool(6, seed=99)
    restored.load_state_dict(state)
    assert stored_tags(restored) == stored_tags(original)
    assert run_pool(restored, 40, 100) == run_pool(original, 40, 100)


def test_state_dict_round_trip_of_a_partly_filled_and_an_empty_pool():
    partial = ImagePool(6, seed=2)
    partial.query(tagged([1.0, 2.0]))
    empty = ImagePool(6, seed=2)
    for source in (partial, empty):
        restored = ImagePool(6, seed=0)
        restored.load_state_dict(source.state_dict())
        assert len(restored) == len(source)
        assert run_pool(restored, 0, 30) == run_pool(source, 0, 30)


def test_loading_a_pool_of_another_size_names_the_field():
    state = ImagePool(4, seed=0).state_dict()
    with pytest.raises(ValueError, match="loss.pool_size"):
        ImagePool(5, seed=0).load_state_dict(state)
