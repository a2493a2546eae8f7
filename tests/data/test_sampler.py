"""maws_fast.data.sampler: an epoch's order as a pure function of (seed, epoch, position)."""
import numpy as np
import pytest

from maws_fast.data.sampler import EpochOrder, permute_within, rank_positions, sample_key
from maws_fast.errors import DataError


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 15, 16, 17, 255, 256, 257, 1000, 4097])
def test_the_keyed_bijection_permutes_every_size(size):
    for key in (0, 1, 2**63 + 5):
        out = permute_within(np.arange(size, dtype=np.uint64), size, np.uint64(key))
        assert sorted(out.tolist()) == list(range(size))
    if size >= 16:  # a real shuffle, not the identity or a rotation
        out = permute_within(np.arange(size, dtype=np.uint64), size, np.uint64(7)).astype(np.int64)
        assert (out != np.arange(size)).mean() > 0.8 and len(set(np.diff(out).tolist())) > size // 4


def test_per_element_sizes_and_keys():
    """Each element has its own domain and key (one call serves positions of several windows)."""
    sizes = np.array([3] * 3 + [10] * 10 + [1], dtype=np.uint64)
    j = np.concatenate([np.arange(3), np.arange(10), [0]]).astype(np.uint64)
    keys = np.array([11] * 3 + [12] * 10 + [13], dtype=np.uint64)
    out = permute_within(j, sizes, keys)
    assert sorted(out[:3].tolist()) == [0, 1, 2] and sorted(out[3:13].tolist()) == list(range(10)) and out[13] == 0
    assert np.array_equal(out[3:13], permute_within(np.arange(10, dtype=np.uint64), 10, np.uint64(12)))


SIZES = [7, 0, 130, 1, 64, 64, 33, 0, 250, 9, 18, 2]  # awkward: empty shards, one-sample shards, ragged


@pytest.mark.parametrize("window", [1, 3, 5, 100])
def test_every_epoch_is_a_permutation_of_all_samples(window):
    n = sum(SIZES)
    for epoch in range(3):
        o = EpochOrder(SIZES, seed=5, epoch=epoch, window=window)
        assert len(o) == n
        ids = o.sample_ids(np.arange(n))
        assert sorted(ids.tolist()) == list(range(n))


def test_the_order_is_a_pure_function_of_seed_epoch_and_position():
    n = sum(SIZES)
    a = EpochOrder(SIZES, seed=5, epoch=1, window=3).sample_ids(np.arange(n))
    # any chunking, any order of asking, a fresh object: the same ids
    rng = np.random.default_rng(0)
    pos = rng.permutation(n)
    b = np.empty(n, dtype=np.int64)
    for chunk in np.array_split(pos, 7):
        b[chunk] = EpochOrder(SIZES, seed=5, epoch=1, window=3).sample_ids(chunk)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, EpochOrder(SIZES, seed=5, epoch=2, window=3).sample_ids(np.arange(n)))
    assert not np.array_equal(a, EpochOrder(SIZES, seed=6, epoch=1, window=3).sample_ids(np.arange(n)))


def test_a_shard_is_read_within_one_window_and_batches_mix_the_window():
    sizes = [1000] * 40
    o = EpochOrder(sizes, seed=0, epoch=0, window=8)
    shard, slot = o.locate(np.arange(len(o)))
    starts = o.win_starts
    for k in range(len(starts) - 1):
        in_window = set(shard[starts[k]:starts[k + 1]].tolist())
        assert len(in_window) == 8  # the window's shards, all of them, and nothing else
        assert all(set(np.flatnonzero(shard == s).tolist()) <= set(range(starts[k], starts[k + 1])) for s in in_window)
    # a batch of 512 consecutive positions draws from (nearly) every shard of its window
    per_batch = [len(set(shard[i:i + 512].tolist())) for i in range(0, len(o) - 512, 512)]
    assert min(per_batch) >= 7
    # neighbours are unrelated: consecutive positions rarely come from the same shard (1/8 at random)
    assert (shard[1:] == shard[:-1]).mean() < 0.2


def test_global_batches_are_the_same_at_every_world_size():
    B = 24
    for step in (0, 3):
        want = np.arange(step * B, (step + 1) * B)
        for world in (1, 2, 3, 4, 6, 8, 12, 24):
            got = np.concatenate([rank_positions(step, B, r, world) for r in range(world)])
            assert np.array_equal(got, want), world
    with pytest.raises(DataError, match="global batch 24 does not split over 5 ranks"):
        rank_positions(0, 24, 0, 5)


def test_sample_keys_depend_on_seed_epoch_and_position_only():
    pos = np.arange(1000)
    k = sample_key(3, 1, pos)
    assert len(set(k.tolist())) == 1000
    assert np.array_equal(k[500:], sample_key(3, 1, pos[500:]))
    assert not np.array_equal(k, sample_key(3, 2, pos)) and not np.array_equal(k, sample_key(4, 1, pos))


def test_resampling_gives_each_sample_the_floor_or_ceiling_of_its_expected_count():
    """Shards written once; weights at read time. A shard's slots follow its total weight, and within
    the shard systematic resampling gives every sample floor or ceil of its share of those slots."""
    rng = np.random.default_rng(1)
    sizes = [50, 0, 30, 80, 1, 40]
    w = [rng.gamma(0.5, size=n) for n in sizes]  # heavy-tailed weights, some tiny
    totals = [x.sum() for x in w]
    for epoch in range(4):
        o = EpochOrder(sizes, seed=9, epoch=epoch, window=2, weights_per_shard=totals)
        n_slots = o.slots
        assert abs(int(n_slots.sum()) - sum(sizes)) <= len(sizes)  # the epoch keeps ~its length
        assert np.all(np.abs(n_slots - o.expected) < 1)  # each shard: floor or ceil of its expected count
        shard, slot = o.locate(np.arange(len(o)))
        for s, ws in enumerate(w):
            mine = np.sort(slot[shard == s])
            assert np.array_equal(mine, np.arange(n_slots[s]))  # every slot once
            if n_slots[s] == 0:
                continue
            counts = np.bincount(o.resolve(s, mine, ws), minlength=len(ws))
            share = ws * (n_slots[s] / ws.sum())
            assert np.all(counts >= np.floor(share) - 1e-9) and np.all(counts <= np.ceil(share) + 1e-9)
    with pytest.raises(DataError, match="use locate"):
        o.sample_ids([0])


def test_resampling_draws_differ_by_epoch_and_average_to_the_weights():
    sizes = [200]
    w = np.linspace(0.1, 3.0, 200)
    counts = np.zeros(200)
    epochs = 200
    for e in range(epochs):
        o = EpochOrder(sizes, seed=2, epoch=e, weights_per_shard=[w.sum()])
        counts += np.bincount(o.resolve(0, np.arange(o.slots[0]), w), minlength=200)
    expected = w * (200 / w.sum()) * epochs
    # per epoch a sample's count is floor or ceil of its share (variance <= 1/4), with a fresh offset each
    # epoch: the sums stay within a few standard deviations of the expected counts, with no drift by weight
    err = counts - expected
    assert np.abs(err).max() <= 4 * np.sqrt(epochs / 4)
    assert abs(err[:100].mean()) < 2 and abs(err[100:].mean()) < 2


@pytest.mark.parametrize("args, match", [
    (([],), "non-empty"), (([3, -1],), "non-empty"), (([3], 0, 0, 0), "at least one shard"),
])
def test_bad_inputs_are_one_clear_error(args, match):
    with pytest.raises(DataError, match=match):
        EpochOrder(*args) if len(args) > 1 else EpochOrder(args[0], 0, 0)


def test_out_of_range_positions_and_bad_weights_are_refused():
    o = EpochOrder([4, 4], 0, 0)
    with pytest.raises(DataError, match="the epoch holds 8 positions"):
        o.locate([8])
    with pytest.raises(DataError, match="resampling weights"):
        EpochOrder([4, 4], 0, 0, weights_per_shard=[1.0, float("nan")])
    with pytest.raises(DataError, match="resampling weights"):
        EpochOrder([4, 4], 0, 0, weights_per_shard=[0.0, 0.0])


def test_a_billion_sample_epoch_is_a_few_megabytes():
    """100k shards of 10k samples: the order's state is O(shards), and any position is found directly."""
    o = EpochOrder(np.full(100_000, 10_000), seed=0, epoch=0, window=64)
    assert len(o) == 10**9 and o.state_bytes() <= 8 * 1024 * 1024
    pos = np.array([0, 1, 123_456_789, 10**9 - 1])
    shard, slot = o.locate(pos)
    assert np.all((0 <= slot) & (slot < 10_000)) and np.all((0 <= shard) & (shard < 100_000))
