"""In-memory image sets (afmp.data.images): digits' split and its training augmentation."""

import pytest
import torch

from afmp.data import build_dataset
from afmp.data.images import TensorImages, rotate_and_zoom


def test_quarter_turn_is_rot90_and_zoom_out_brings_in_background():
    x = torch.arange(16.0).reshape(1, 4, 4)
    # Counter-clockwise as the array is printed: the top row becomes the left column.
    assert torch.allclose(rotate_and_zoom(x, 90.0, 1.0, torch.zeros(1)), torch.rot90(x, 1, (1, 2)), atol=1e-5)
    assert torch.allclose(rotate_and_zoom(x, 0.0, 1.0, torch.zeros(1)), x, atol=1e-5)
    small = rotate_and_zoom(x, 0.0, 0.5, torch.tensor([-3.0]))
    # At half size the image covers the middle 2x2 pixels; the corners are pure fill.
    assert small[0, 0, 0] == -3.0 and small[0, 3, 3] == -3.0 and small[0, 0, 3] == -3.0


def test_augmentation_pads_with_background_not_with_zero():
    fill = torch.tensor([-0.75])
    blank = fill.expand(3, 1, 8, 8).clone()  # three images that are all background
    data = TensorImages(
        blank, torch.zeros(3, dtype=torch.long), crop_padding=2, degrees=30, scale=0.2, fill=fill
    )
    torch.manual_seed(0)
    for i in range(3):
        x, _ = data[i]
        assert x.shape == (1, 8, 8)
        assert torch.allclose(x, blank[i], atol=1e-6)


def test_shift_moves_the_image_by_at_most_crop_padding():
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 2] = 1.0
    data = TensorImages(image, torch.zeros(1, dtype=torch.long), crop_padding=1)
    torch.manual_seed(0)
    places = set()
    for _ in range(60):
        x, _ = data[0]
        ((r, c),) = torch.nonzero(x[0]).tolist()
        places.add((r, c))
    assert places == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}


def test_digits_split_sizes_and_augmentation_only_on_train():
    d = build_dataset("digits", degrees=10, scale=0.1)
    assert (len(d.train), len(d.val), len(d.test)) == (1258, 180, 359)
    assert d.train.degrees == 10 and d.train.scale == 0.1 and d.train.crop_padding == 1
    assert d.test.degrees == 0 and d.test.crop_padding == 0
    x, y = d.test[0]
    assert torch.equal(x, d.test.images[0]) and y == d.test.labels[0]
    plain = build_dataset("digits", augment=False)
    assert plain.train.crop_padding == 0 and plain.train.degrees == 0


@pytest.mark.parametrize("kw", [{"crop_padding": -1}, {"degrees": -5.0}, {"scale": 1.0}])
def test_bad_augmentation_settings_say_what_was_expected(kw):
    with pytest.raises(ValueError, match="expected crop_padding >= 0"):
        TensorImages(torch.zeros(1, 1, 4, 4), torch.zeros(1, dtype=torch.long), **kw)
