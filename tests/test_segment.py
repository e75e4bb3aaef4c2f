"""The per-image progress of a folder run: images done of the total and the time left, from the mean so far."""

from __future__ import annotations

from common.segment import _progress


def test_time_left_is_the_mean_time_per_image_times_the_images_to_do():
    assert _progress(1, 4, 10.0) == " (1/4, about 30 s left)"
    assert _progress(2, 500, 20.0) == " (2/500, about 83 min left)"  # 10 s each, 498 to go: 4,980 s
    assert _progress(10, 10_000, 100.0) == " (10/10000, about 27.8 h left)"  # 99,900 s
    assert _progress(4, 4, 40.0) == " (4/4, about 0 s left)"


def test_no_progress_without_a_known_total():
    assert _progress(3, None, 5.0) == ""
    assert _progress(0, 10, 0.0) == ""
