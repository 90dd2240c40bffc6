"""bench.ops.fa4_tiles: configurations parsed into FA4's keyword arguments, bad ones refused by name (the timings
themselves need flash-attn-4 on a GPU)."""

from __future__ import annotations

import pytest

from bench.ops.fa4_tiles import main, parse_config


def test_configurations_become_fa4_arguments():
    assert parse_config("128x144") == {"tile_mn": (128, 144), "mma_pv_is_rs": True, "intra_wg_overlap": True,
                                       "num_threads": 384}
    assert parse_config("192x112-nors-noov") == {"tile_mn": (192, 112), "mma_pv_is_rs": False,
                                                 "intra_wg_overlap": False, "num_threads": 512}


@pytest.mark.parametrize("argv,fragment", [
    (["--configs", "128x144-fast"], "unknown flag(s) ['fast']"),
    (["--configs", "128by144"], "is not MxN"),
    (["--configs", "128x120"], "a multiple of 16"),
    (["--configs", "100x128"], "tile_m must be 64, 128 or 192"),
    (["--shapes", "flux,sd3"], "--shapes: unknown sd3; accepted: flux, wan13, wan14"),
])
def test_bad_arguments_are_named(argv, fragment):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert fragment in str(info.value)
