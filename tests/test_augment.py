"""Crops, flips, PCA colour noise, mean subtraction and the ten test views (docs/spec.md §4)."""
import numpy as np
import pytest
import torch

from replica import augment

Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
EIG = {"eigenvalues": [4000.0, 600.0, 90.0], "eigenvectors": Q.tolist()}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode,lam_scale", [("as-run", 1.0), ("paper-text", None)])
def test_pca_noise_zero_mean_and_covariance(mode, lam_scale):
    n = 200_000
    s = augment.draw_pca_shift(n, EIG["eigenvalues"], EIG["eigenvectors"], gen(1), mode).double().numpy()
    lam = np.array(EIG["eigenvalues"])
    # as-run: 0.1·z·√λ ⇒ cov 0.01·Σ λ p pᵀ; paper-text: α·λ/255 with α ~ N(0, 0.1²) ⇒ 0.01·Σ (λ/255)² p pᵀ
    var = lam if mode == "as-run" else (lam / 255.0) ** 2
    want = 0.01 * (Q * var) @ Q.T
    sd = np.sqrt(np.diag(want))
    assert np.all(np.abs(s.mean(0)) < 5 * sd / np.sqrt(n))
    np.testing.assert_allclose(np.cov(s.T), want, rtol=0.03, atol=0.01 * sd.max() ** 2)


def test_noise_is_one_shift_per_image_then_divided_by_1_1():
    images = torch.full((6, 3, 64, 64), 100, dtype=torch.uint8)
    mean = torch.zeros(3, 32, 32)
    x = augment.train_batch(images, mean, gen(2), pca=EIG, size=32)
    flat = x.flatten(2)  # (B, 3, pixels)
    assert torch.allclose(flat.amax(2), flat.amin(2))  # the same shift for every pixel of an image
    g = gen(2)
    augment.draw_crops(6, g, 32)  # the crops come first from the same generator
    shift = augment.draw_pca_shift(6, EIG["eigenvalues"], EIG["eigenvectors"], g, "as-run")
    torch.testing.assert_close(flat[:, :, 0], (100 + shift) / 1.1)
    assert len({tuple(r) for r in flat[:, :, 0].tolist()}) == 6  # a new draw per image
    other = augment.train_batch(images, mean, gen(3), pca=EIG, size=32)
    assert not torch.allclose(other, x)  # another generator (another epoch): other draws
    plain = augment.train_batch(images, mean, gen(2), pca=EIG, noise=False, size=32)
    assert torch.all(plain == 100)  # noise off: no shift and no ÷1.1
    paper = augment.train_batch(images, mean, gen(2), pca=EIG, pca_mode="paper-text", size=32).flatten(2)
    g = gen(2)
    augment.draw_crops(6, g, 32)
    shift = augment.draw_pca_shift(6, EIG["eigenvalues"], EIG["eigenvectors"], g, "paper-text")
    torch.testing.assert_close(paper[:, :, 0], 100 + shift)  # paper-text: no ÷1.1


def test_crop_offsets_cover_0_to_32_and_flips_are_half():
    oy, ox, fl = augment.draw_crops(20_000, gen(4))
    for o in (oy, ox):
        assert o.min() == 0 and o.max() == 32
        assert torch.bincount(o, minlength=33).min() > 400  # all 33 positions, roughly uniform
    assert 0.48 < fl.float().mean() < 0.52
    oy, ox, fl = augment.draw_crops(100, gen(5), chunk=32)
    for t in (oy, ox, fl):
        chunks = t.split(32)
        assert all(torch.all(c == c[0]) for c in chunks)  # one draw per chunk of 32 images
    assert len({int(c[0]) for c in oy.split(32)}) > 1


def test_crop_equals_slicing_by_hand():
    images = torch.arange(4 * 3 * 64 * 64, dtype=torch.int32).reshape(4, 3, 64, 64)
    oy, ox, fl = [0, 32, 5, 17], [32, 0, 9, 3], [False, True, True, False]
    got = augment.crop(images, oy, ox, fl, 32)
    for i in range(4):
        want = images[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(got[i], torch.flip(want, [-1]) if fl[i] else want)


def test_ten_views_and_centre_view_against_hand_crops_with_the_centre_mean():
    rng = torch.Generator().manual_seed(6)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=rng, dtype=torch.uint8)
    mean_image = torch.rand(3, 64, 64, generator=rng) * 255
    mean_crop = augment.centre_crop_of(mean_image, 32)
    torch.testing.assert_close(mean_crop, mean_image[:, 16:48, 16:48])
    views = augment.ten_views(images, mean_crop, 32)
    assert views.shape == (2, 10, 3, 32, 32)
    offsets = [(0, 0), (0, 32), (16, 16), (32, 0), (32, 32)]
    for v, (y, x) in enumerate(offsets):
        hand = images[:, :, y:y + 32, x:x + 32].float() - mean_image[:, 16:48, 16:48]  # never the mean at (y, x)
        torch.testing.assert_close(views[:, v], hand)
        hand_flip = images[:, :, y:y + 32, x:x + 32].flip(-1).float() - mean_image[:, 16:48, 16:48]
        torch.testing.assert_close(views[:, v + 5], hand_flip)  # the mean crop is not flipped
    torch.testing.assert_close(augment.centre_view(images, mean_crop, 32), views[:, 2])


def test_default_geometry_is_224_of_256():
    images = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    assert augment.train_batch(images, torch.zeros(3, 224, 224), gen()).shape == (1, 3, 224, 224)
    assert augment.ten_views(images, torch.zeros(3, 224, 224)).shape == (1, 10, 3, 224, 224)
    assert augment.VIEW_OFFSETS == ((0, 0), (0, 32), (16, 16), (32, 0), (32, 32))


def test_bad_pca_mode():
    with pytest.raises(ValueError, match="pca mode"):
        augment.draw_pca_shift(1, [1, 1, 1], np.eye(3), gen(), "fancy")


def test_the_gathers_give_the_loops_pixels_bit_for_bit():
    """augment.cut (the crops as one gather, crop_on=device and nvJPEG batches on a GPU) against
    augment.crop, from CHW and HWC images, offsets as ints or floats; the float batch made from
    either (− mean, + colour shift, ÷1.1) bit-equal although their memory layouts differ; the
    ten views as one gather against the stacked ten views."""
    rng = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (40, 3, 64, 64), generator=rng, dtype=torch.uint8)
    hwc = images.permute(0, 2, 3, 1).contiguous()
    mean_crop = torch.rand(3, 32, 32, generator=rng) * 255
    for chunk in (None, 8):
        oy, ox, fl = augment.draw_crops(40, rng, border=32, chunk=chunk)
        want = augment.crop(images, oy, ox, fl, 32)
        got = augment.cut(images, oy, ox, fl, 32)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(augment.cut(hwc, oy.float(), ox.float(), fl, 32, hwc=True), want)
        shift = augment.draw_pca_shift(40, [900.0, 40.0, 5.0], torch.eye(3), rng)
        for s, pca_mode in ((shift, "as-run"), (shift, "paper-text"), (None, "as-run")):
            assert torch.equal(augment.finish(got, mean_crop, s, pca_mode), augment.finish(want, mean_crop, s, pca_mode))
    assert fl.any() and not fl.all()  # both kinds of crop were cut
    mean_crop = augment.centre_crop_of(torch.rand(3, 64, 64, generator=rng) * 255, 48)
    views = augment.ten_views_gathered(images, mean_crop, 48)
    assert views.shape == (40, 10, 3, 48, 48) and torch.equal(views, augment.ten_views(images, mean_crop, 48))


def test_the_ten_view_gather_reads_nothing_from_the_host_once_warm():
    """On a GPU a tensor made from a Python list is a blocking copy: a wait for the device at
    every evaluation batch. Recorded on the meta device (a device that is not the CPU): after
    the first call, the ten-view gather makes no tensor from host data and passes no tensor of
    another device to any torch function; each view still reads the right pixels (the CPU)."""
    from runs_helpers import HostReads

    images = torch.empty((4, 3, 40, 40), dtype=torch.uint8, device="meta")
    mean_crop = torch.empty((3, 32, 32), device="meta")
    augment.ten_views_gathered(images, mean_crop, 32)  # the first call may make its windows there
    with HostReads() as reads:
        views = augment.ten_views_gathered(images, mean_crop, 32)
    assert views.shape == (4, 10, 3, 32, 32) and reads.seen == [], reads.seen
    cpu = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    mean = torch.rand(3, 32, 32) * 255
    assert torch.equal(augment.ten_views_gathered(cpu, mean, 32), augment.ten_views(cpu, mean, 32))
