"""Seeds: the stream ids and the hash are part of every run's numbers, so they are pinned here."""
from maws_fast.seeds import Stream, mix_seed


def test_stream_ids_are_distinct_and_pinned():
    assert {s.name: int(s) for s in Stream} == {
        "PERMUTATION": 1, "AUGMENT": 2, "MASK": 3, "MIXUP": 4, "DROP_PATH": 5, "RANDAUG": 6, "ERASE": 7, "MAE_INIT": 11, "WSP_INIT": 12,
        "EVAL_SUBSET": 13, "FT_INIT": 14, "LIT_INIT": 15, "CAPTIONS": 16, "DALI_PIPELINE": 21, "FOLDER_ORDER": 23}


def test_mix_seed_values_are_those_every_earlier_run_used():
    # Values of the splitmix64 mix before it moved to maws_fast.seeds: a change here would change
    # the masks, crops, sample order and init of every seeded run (and break exact resume).
    assert mix_seed(Stream.MASK, 0, 7) == 1455850016248399890
    assert mix_seed(0, Stream.MAE_INIT) == 7394868257919787627
    assert mix_seed(1, 2, 3, 4, 5) == 8502008235683969141


def test_mix_seed_separates_streams_and_fits_63_bits():
    seeds = {mix_seed(s, 0, e, b) for s in Stream for e in range(4) for b in range(16)}
    assert len(seeds) == len(Stream) * 64
    assert all(0 <= v < 2**63 for v in seeds)
    assert len({v & 0xFFFFFFFF for v in seeds}) == len(seeds)  # torch's CPU generator reads the low 32 bits
