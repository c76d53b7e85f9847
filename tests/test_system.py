"""Environment facts: the exact allocation peak used for per-step memory figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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


RESIDENT_PEAKS = r"""
import json, torch
from bayeslora.system import ResidentPeak, peak_memory_mb

def touched(mib):
    tensor = torch.empty(mib * 2**18)
    tensor.fill_(1.0)
    return tensor

base = ResidentPeak()
with base:
    pass
big = touched(400)  # the process's lifetime peak, before both probes
del big
with ResidentPeak() as outer:
    middle = touched(150)
    del middle
    with ResidentPeak() as inner:
        small = touched(30)
        del small
print(json.dumps({"base": base.peak_mib, "outer": outer.peak_mib, "inner": inner.peak_mib,
                  "lifetime": peak_memory_mb(), "reset": not outer.lifetime}))
"""


def test_resident_peaks_belong_to_their_block_and_the_lifetime_peak_survives_the_resets():
    out = subprocess.run([sys.executable, "-c", RESIDENT_PEAKS], capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    if not peaks["reset"]:
        pytest.skip("this kernel cannot reset the resident high-water mark")
    base = peaks["base"]
    assert 140 < peaks["outer"] - base < 200  # the 150 MiB inside it, not the 400 MiB before it
    assert 20 < peaks["inner"] - base < 60
    assert peaks["lifetime"] - base > 380  # peak_memory_mb keeps what the resets erased from ru_maxrss
