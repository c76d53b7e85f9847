"""Environment facts: the exact allocation peak used for per-step memory figures."""

from __future__ import annotations

import torch

from bayeslora.system import AllocationPeak


def test_allocation_peak_counts_live_bytes_above_the_start():
    before = torch.ones(1_000_000)  # 4 MB allocated earlier: not counted, and freed inside the block
    with AllocationPeak("cpu") as probe:
        del before
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB: 3 MB live
        del a
        c = torch.ones(250_000)  # 1 MB: 3 MB live again, never more
        del b, c
    assert probe.peak_bytes == 3_000_000
    assert probe.peak_mib == 3_000_000 / 2**20


def test_allocation_peak_of_a_block_that_allocates_nothing_is_zero():
    with AllocationPeak() as probe:  # the probe's own bookkeeping is not counted
        pass
    assert probe.peak_bytes == 0


def test_allocation_peak_does_not_drift_across_probes():
    # The allocator's process-wide "Total Allocated" keeps blocks allocated under one probe and freed after
    # it; a later probe must not count them.
    kept = []
    for _ in range(3):
        with AllocationPeak("cpu") as probe:
            kept.append(torch.ones(250_000))  # 1 MB, freed only after the probe
        assert probe.peak_bytes == 1_000_000
    kept.clear()
    with AllocationPeak("cpu") as probe:
        a = torch.ones(500_000)  # 2 MB
        del a
    assert probe.peak_bytes == 2_000_000
