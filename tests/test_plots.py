"""utils/run/plots.py: the training-reward curve's running mean (the plotted data, not pixels)."""

import pytest

from utils.run.plots import running_mean, smoothing_window


def test_the_running_mean_averages_each_value_with_the_ones_before_it():
    assert running_mean([1.0, 2.0, 3.0, 4.0, 6.0], 2) == pytest.approx([1.0, 1.5, 2.5, 3.5, 5.0])
    assert running_mean([1.0, 2.0, 3.0, 4.0, 6.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 13 / 3])
    assert running_mean([0.2, 0.4], 1) == pytest.approx([0.2, 0.4])


@pytest.mark.parametrize("steps, window", [(40, 5), (8, 2), (3, 1), (1000, 50)])
def test_the_window_smooths_a_short_run_too(steps, window):
    # the quickstart's 40 steps: 5 (5% would be 2, which leaves the noise); never over a quarter of the run
    assert smoothing_window(steps) == window
