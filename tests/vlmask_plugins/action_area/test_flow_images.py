"""CoCLR's flow view: DIS flow images of a textured square moving right and down."""

from __future__ import annotations

import numpy as np

from vlmask_plugins.action_area.flow import flow_images


def test_a_square_moving_right_reads_as_positive_x_flow():
    rng = np.random.default_rng(0)
    texture = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    frames = np.full((3, 64, 64, 3), 90, dtype=np.uint8)
    for t in range(3):  # 3 px right and 1 px down per frame
        frames[t, 20 + t:36 + t, 20 + 3 * t:36 + 3 * t] = texture
    images = flow_images(frames, preset="medium")
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    inside = images[0, 24:32, 26:34]
    x = (inside[..., 0].astype(float) - 127.5) * 20 / 127.5  # back to pixels (bound 20)
    y = (inside[..., 1].astype(float) - 127.5) * 20 / 127.5
    assert 2.0 < np.median(x) < 4.0 and 0.3 < np.median(y) < 1.7
    assert (images[..., 2] == 128).all() and np.array_equal(images[2], images[1])
    corner = images[0, :8, :8, :2].astype(int) - 128
    # the flat background barely moves (DIS smoothing bleeds a little into textureless areas)
    assert np.abs(corner).max() * 20 / 127.5 < 0.6
