"""benchmarks/endurance.py: its analysis (the 500-step run itself is a benchmark, not a test)."""

import pytest

from benchmarks.endurance import analyse


def test_a_flat_run_is_flat_and_medians_ignore_warm_up_and_checkpoint_spikes():
    times = [2.0] * 3 + [0.1] * 394 + [1.5] * 3  # slow first steps, a few checkpoint steps at the end
    rss = [900 * 2**20 + 4096 * (i % 7) for i in range(400)]  # allocator jitter, no trend
    s = analyse(times, rss, window=100, cpu_seconds=[0.09] * 400)
    assert s["rss_flat"] and s["step_time_flat"] and s["cpu_time_flat"] and s["cpu_time_ratio"] == 1
    assert s["step_s_first_median"] == s["step_s_last_median"] == pytest.approx(0.1)
    assert abs(s["rss_growth_mib"]) < 0.01 and abs(s["rss_slope_kib_per_step_last_half"]) < 0.1


def test_a_leak_and_a_slowdown_are_not_flat():
    steps = 500
    leak = [800 * 2**20 + i * 512 * 1024 for i in range(steps)]  # 0.5 MiB per step: +250 MiB
    s = analyse([0.1] * steps, leak, window=100)
    assert not s["rss_flat"] and s["step_time_flat"]
    assert s["rss_slope_kib_per_step_last_half"] == pytest.approx(512)
    assert s["rss_growth_mib"] == pytest.approx(200, rel=0.01)  # the two medians are 400 steps apart
    slowing = [0.1 * (1 + i / 250) for i in range(steps)]  # 3x slower by the end
    s = analyse(slowing, [800 * 2**20] * steps, window=100, cpu_seconds=slowing)
    assert s["rss_flat"] and not s["step_time_flat"] and s["step_time_ratio"] > 2 and not s["cpu_time_flat"]


def test_analysis_needs_two_windows():
    with pytest.raises(ValueError, match="two windows of 100"):
        analyse([0.1] * 150, [1] * 150, window=100)
