"""In-memory image sets (afmp.data.images): the split, the normalisation, digits and the training augmentation."""

import numpy as np
import pytest
import torch

from afmp.data import build_dataset
from afmp.data.images import TensorImages, bundle_from_arrays, rotate_and_zoom, split_indices


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


def test_split_fractions_must_be_non_negative_and_leave_a_training_image():
    """Each fraction is >= 0 and the two together < 1: a test split of 99% is allowed
    (one training image of 100), half and half (nothing left to train on) is not."""
    train, val, test = split_indices(100, val_fraction=0.0, test_fraction=0.99)
    assert (len(train), len(val), len(test)) == (1, 0, 99)
    train, val, test = split_indices(100, val_fraction=0.99, test_fraction=0.0)
    assert (len(train), len(val), len(test)) == (1, 99, 0)
    for val_fraction, test_fraction in [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (-0.1, 0.2), (0.2, -0.1)]:
        with pytest.raises(ValueError, match="must leave a training set"):
            split_indices(10, val_fraction=val_fraction, test_fraction=test_fraction)


def test_split_seed_defaults_to_0_and_picks_the_permutation():
    """The split is a fixed permutation of split_seed (0 unless given): numpy's
    default_rng(0).permutation(10) is [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]; the test split is its
    head (3 of 10), validation the next 2, training the rest."""
    train, val, test = split_indices(10, val_fraction=0.2, test_fraction=0.3)
    assert (test.tolist(), val.tolist(), train.tolist()) == ([4, 6, 2], [7, 3], [5, 9, 0, 8, 1])
    # default_rng(1).permutation(10) is [8, 4, 7, 0, 1, 2, 5, 9, 6, 3].
    train, val, test = split_indices(10, val_fraction=0.2, test_fraction=0.3, split_seed=1)
    assert (test.tolist(), val.tolist(), train.tolist()) == ([8, 4, 7], [0, 1], [2, 5, 9, 6, 3])


def test_stratified_split_breaks_ties_between_classes_by_the_permutation():
    """Two classes of 10 (even and odd indices): the k-th image of each class has the same
    place, (k + 0.5) / 10, and the one earlier in the permutation goes first (a stable sort:
    the split must not depend on the sort algorithm numpy picks for the machine).
    default_rng(0).permutation(20) is [4, 19, 6, 2, 13, 16, 3, 11, 10, 8, 0, 12, 7, 5, 18,
    17, 14, 9, 1, 15]: evens 4 6 2 16 10 8 0 12 18 14, odds 19 13 3 11 7 5 17 9 1 15, and
    the even one comes first in every pair."""
    train, val, test = split_indices(20, val_fraction=0.2, test_fraction=0.3, stratify=np.arange(20) % 2)
    assert test.tolist() == [4, 19, 6, 13, 2, 3]
    assert val.tolist() == [16, 11, 10, 7]
    assert train.tolist() == [8, 5, 0, 17, 12, 9, 18, 1, 14, 15]


def test_bundle_normalises_every_split_with_the_training_splits_channel_statistics():
    """Four (3, 1, 2) images; default_rng(0).permutation(4) is [2, 0, 1, 3], so image 2 is the
    test split, image 0 validation, images 1 and 3 training. Per channel the four training
    pixels are [0, 0, 0, 1], [1, 1, 1, 2], [2, 2, 2, 6]: means 0.25, 1.25, 3 and (n - 1)
    standard deviations 0.5, 0.5, 2. The fill is a raw 0 normalised, -mean / std."""
    images = np.array(
        [
            [[[1.25, -0.25]], [[2.25, 0.25]], [[5.0, 3.0]]],  # validation
            [[[0.0, 0.0]], [[1.0, 1.0]], [[2.0, 2.0]]],  # training
            [[[0.75, 0.25]], [[1.75, 0.75]], [[7.0, -1.0]]],  # test
            [[[0.0, 1.0]], [[1.0, 2.0]], [[2.0, 6.0]]],  # training
        ]
    )  # float64: the bundle holds float32
    labels = np.array([0, 1, 2, 3], dtype=np.int32)  # the bundle holds int64
    bundle = bundle_from_arrays("tiny", images, labels, val_fraction=0.25, test_fraction=0.25, num_classes=4)
    assert bundle.name == "tiny"
    assert bundle.model_args == {"img_size": 2, "in_chans": 3, "num_classes": 4}
    assert bundle.mean == pytest.approx((0.25, 1.25, 3.0)) and bundle.std == pytest.approx((0.5, 0.5, 2.0))
    for part in (bundle.train, bundle.val, bundle.test):
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
    assert bundle.train.labels.tolist() == [1, 3]
    assert bundle.val.labels.tolist() == [0] and bundle.test.labels.tolist() == [2]
    expected_train = [
        [[[-0.5, -0.5]], [[-0.5, -0.5]], [[-0.5, -0.5]]],
        [[[-0.5, 1.5]], [[-0.5, 1.5]], [[-0.5, 1.5]]],
    ]
    torch.testing.assert_close(bundle.train.images, torch.tensor(expected_train))
    torch.testing.assert_close(
        bundle.val.images, torch.tensor([[[[2.0, -1.0]], [[2.0, -2.0]], [[1.0, 0.0]]]])
    )
    torch.testing.assert_close(
        bundle.test.images, torch.tensor([[[[1.0, 0.0]], [[1.0, -1.0]], [[2.0, -2.0]]]])
    )
    torch.testing.assert_close(bundle.train.fill, torch.tensor([-0.5, -2.5, -1.5]))


def test_bundle_split_is_seed_0_unstratified_unless_asked():
    """Labels 0..9 name the images: split_seed 0 (default_rng(0).permutation(10) is
    [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]) unless given; split_seed 1 gives [8, 4, 7, 0, 1, ...]."""
    images = np.zeros((10, 1, 2, 2), dtype=np.float32)
    common = dict(val_fraction=0.2, test_fraction=0.3, num_classes=10)
    plain = bundle_from_arrays("x", images, np.arange(10), **common)
    assert (plain.test.labels.tolist(), plain.val.labels.tolist()) == ([4, 6, 2], [7, 3])
    assert plain.train.labels.tolist() == [5, 9, 0, 8, 1]
    other = bundle_from_arrays("x", images, np.arange(10), split_seed=1, **common)
    assert (other.test.labels.tolist(), other.val.labels.tolist()) == ([8, 4, 7], [0, 1])


def test_bundle_stratifies_by_class_only_with_stratify():
    """Two classes of 10 (index parity) split 0.3 for test: unstratified, the test split is
    the permutation's head [4, 19, 6, 2, 13, 16], classes 0 1 0 0 1 0; stratified, the classes
    are dealt out in turn, [4, 19, 6, 13, 2, 3], classes 0 1 0 1 0 1."""
    images = np.zeros((20, 1, 2, 2), dtype=np.float32)
    labels = np.arange(20) % 2
    common = dict(val_fraction=0.2, test_fraction=0.3, num_classes=2)
    assert bundle_from_arrays("x", images, labels, **common).test.labels.tolist() == [0, 1, 0, 0, 1, 0]
    off = bundle_from_arrays("x", images, labels, stratify=False, **common)
    assert off.test.labels.tolist() == [0, 1, 0, 0, 1, 0]
    on = bundle_from_arrays("x", images, labels, stratify=True, **common)
    assert on.test.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert on.val.labels.tolist() == [0, 1, 0, 1]  # [16, 11, 10, 7]
