"""The paper's augmentation and test views as batched tensor operations (docs/spec.md §4).

Pure functions of (uint8 images, parameters, generator). They run wherever the batch lives:
in CPU loader workers, or on the GPU after a uint8 transfer. The random draws are made on the
CPU from an explicit ``torch.Generator`` and are tiny (a few numbers per image), so a batch
gets the same crops, flips and colour shifts on any device, and a resumed run redraws exactly
what the interrupted one drew.
"""
from __future__ import annotations

import torch
from torch import Tensor

CROP = 224  # §4.1: 224×224 patches of the 256×256 images
BORDER = 32  # offsets uniform on [0, 32] inclusive: 33 positions per axis (convdata_jpeg.py:77)
CENTRE = (16, 16)  # single-view test crop (convdata_jpeg.py:235)
# Ten test views (y, x): the four corners and the centre (convdata_jpeg.py:74-76), each as-is
# (views 0-4) and flipped horizontally (views 5-9).
VIEW_OFFSETS = ((0, 0), (0, 32), (16, 16), (32, 0), (32, 32))
VIEW_NAMES = ("top-left", "top-right", "centre", "bottom-left", "bottom-right")  # the ten: these, then each flipped
PCA_MODES = ("as-run", "paper-text")


def draw_crops(n: int, generator: torch.Generator, border: int = BORDER, chunk: int | None = None,
               flip: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets (y, x) uniform on [0, border] and a fair flip coin, per image (CPU int64/bool).

    ``chunk=32`` draws one offset and one flip per 32 consecutive images, as the 2012 data
    provider did (convdata_jpeg.py:238-246).
    """
    m = n if not chunk else -(-n // chunk)
    oy = torch.randint(0, border + 1, (m,), generator=generator)
    ox = torch.randint(0, border + 1, (m,), generator=generator)
    fl = torch.rand(m, generator=generator) < 0.5 if flip else torch.zeros(m, dtype=torch.bool)
    if chunk:
        oy, ox, fl = (t.repeat_interleave(chunk)[:n] for t in (oy, ox, fl))
    return oy, ox, fl


def crop(images: Tensor, oy, ox, flips, size: int = CROP) -> Tensor:
    """(B, 3, S, S) → (B, 3, size, size): image i cut at (oy[i], ox[i]), mirrored where flips[i]."""
    b = images.shape[0]
    out = images.new_empty((b, images.shape[1], size, size))
    oy, ox, flips = (t.tolist() if torch.is_tensor(t) else list(t) for t in (oy, ox, flips))
    for i in range(b):
        patch = images[i, :, oy[i]:oy[i] + size, ox[i]:ox[i] + size]  # (3, size, size) view
        out[i] = patch.flip(-1) if flips[i] else patch
    return out


def cut(images: Tensor, oy, ox, flips, size: int = CROP, hwc: bool = False) -> Tensor:
    """:func:`crop` as one gather on the images' device (no loop over the batch: one kernel on a
    GPU where the loop queues two a image). ``images``: uint8 (B, 3, S, S), or (B, S, S, 3) with
    ``hwc`` (as JPEG decoders write them). The crops come back (B, 3, size, size) with
    channels_last memory, the same values as :func:`crop` (tests/test_augment.py)."""
    dev = images.device
    oy, ox = (torch.as_tensor(t).to(dev, torch.long, non_blocking=True) for t in (oy, ox))
    flips = torch.as_tensor(flips).to(dev, torch.bool, non_blocking=True)
    rows, cols = _windows(oy, ox, flips, size)
    b = torch.arange(images.shape[0], device=dev)[:, None, None]
    at = (b, rows[:, :, None], cols[:, None, :])
    patches = images[at] if hwc else images[at[0], :, at[1], at[2]]  # (B, size, size, 3) either way
    return patches.permute(0, 3, 1, 2)


def _windows(oy: Tensor, ox: Tensor, flips: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Each window's source rows and columns, (…, size) each: columns read right to left where
    flipped (a mirrored patch's column j is the image's ox + size − 1 − j)."""
    r = torch.arange(size, device=oy.device)
    return oy[..., None] + r, ox[..., None] + torch.where(flips[..., None], size - 1 - r, r)


def draw_pca_shift(n: int, eigenvalues, eigenvectors, generator: torch.Generator, mode: str = "as-run",
                   scale: float = 0.1) -> Tensor:
    """One RGB shift per image (B, 3), in 0–255 units, from the training pixels' eigen-system.

    - as-run: ``0.1·Σ_i z_i·√λ_i·p_i`` with z ~ N(0, 1) (convdata.py:40-41; σ_i = √λ_i by
      name, ``color_stdevs``). Its covariance is 0.01·Σ λ_i p_i p_iᵀ.
    - paper-text: ``Σ_i α_i·λ_i·p_i`` with α ~ N(0, 0.1²) and λ of pixels in [0, 1], scaled back
      to 0–255 (fb.resnet.torch's reading of §4.1).
    """
    if mode not in PCA_MODES:
        raise ValueError(f"pca mode: expected one of {PCA_MODES}, got {mode!r}")
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)  # (3,) 0–255² units
    vecs = torch.as_tensor(eigenvectors, dtype=torch.float64)  # (3, 3), eigenvectors as columns
    z = torch.randn(n, 3, generator=generator, dtype=torch.float64) * scale  # α_i = 0.1·z_i
    coef = z * (lam.clamp(min=0).sqrt() if mode == "as-run" else lam / 255.0)  # √λ, or λ₀₁·255
    return (coef @ vecs.T).float()  # (B, 3)


def normalize(crops: Tensor, mean_crop: Tensor, shift: Tensor | None = None, divide: float = 1.0) -> Tensor:
    """float32 ``(crops − mean_crop + shift) / divide``; the mean crop is never moved or flipped."""
    x = torch.sub(crops, mean_crop)  # (B, 3, h, w) − (3, h, w), uint8 → float32
    if shift is None:
        return x.div_(divide) if divide != 1.0 else x
    # non-blocking: from pinned memory onto a GPU the copy is queued, not waited for (a blocking
    # copy here made the CPU wait for the GPU once a step); the caller pins (train.to_device)
    s = shift.to(x.device, torch.float32, non_blocking=True)[:, :, None, None] / divide  # one shift per image
    return torch.add(s, x, alpha=1.0 / divide, out=x)  # (x + shift) / divide in one pass


def centre_crop_of(mean_image: Tensor, size: int = CROP) -> Tensor:
    """The centre size×size of the (3, S, S) mean image (convdata_jpeg.py:95)."""
    s = mean_image.shape[-1]
    o = (s - size) // 2
    return mean_image[:, o:o + size, o:o + size].float().contiguous()


def draw_train(n: int, generator: torch.Generator, *, pca: dict | None = None, pca_mode: str = "as-run",
               noise: bool = True, chunk: int | None = None, flip: bool = True, border: int = BORDER):
    """Every random number a training batch needs: offsets, flips, and the colour shifts (or None)."""
    oy, ox, fl = draw_crops(n, generator, border, chunk, flip)
    shift = None
    if noise and pca is not None:
        shift = draw_pca_shift(n, pca["eigenvalues"], pca["eigenvectors"], generator, pca_mode)
    return oy, ox, fl, shift


def finish(crops: Tensor, mean_crop: Tensor, shift: Tensor | None, pca_mode: str = "as-run") -> Tensor:
    """uint8 training crops → the float32 batch the net sees: − mean, + shift, ÷1.1 (as-run).

    as-run divides the noisy crop by 1.1 "so that the overall scale of the training data
    doesn't become too different from the test data" (convdata_jpeg.py:155-159), and only while
    the noise is on; paper-text never divides.
    """
    if shift is None:
        return normalize(crops, mean_crop.to(crops.device))
    return normalize(crops, mean_crop.to(crops.device), shift, 1.1 if pca_mode == "as-run" else 1.0)


def train_batch(images: Tensor, mean_crop: Tensor, generator: torch.Generator, *, pca: dict | None = None,
                pca_mode: str = "as-run", noise: bool = True, chunk: int | None = None, flip: bool = True,
                size: int = CROP) -> Tensor:
    """A training batch in one call: random crops and flips, mean subtraction, PCA colour noise.

    ``pca`` is the store's ``pca.json`` (eigenvalues, eigenvectors); ``noise=False`` (or no
    ``pca``) leaves colour alone. Loaders split this in two: :func:`draw_train` + :func:`crop`
    in the workers (uint8 out, a quarter of the bytes), :func:`finish` where the batch is used.
    """
    oy, ox, fl, shift = draw_train(images.shape[0], generator, pca=pca, pca_mode=pca_mode, noise=noise,
                                   chunk=chunk, flip=flip, border=images.shape[-1] - size)
    return finish(crop(images, oy, ox, fl, size), mean_crop, shift, pca_mode)


def centre_view(images: Tensor, mean_crop: Tensor, size: int = CROP) -> Tensor:
    """The single test view: the centre crop, no flip, no noise."""
    o = (images.shape[-1] - size) // 2
    return normalize(images[:, :, o:o + size, o:o + size], mean_crop)


def ten_views_gathered(images: Tensor, mean_crop: Tensor, size: int = CROP) -> Tensor:
    """:func:`ten_views` as one gather on the images' device, (B, 10, 3, size, size) with the
    channels last in memory: the same values (tests/test_augment.py), one kernel and no stack on
    a GPU. On the CPU the stacked slices are faster (0.21× their rate for this, 32 images,
    ``python tools/bench.py eval``, 2026-12-08)."""
    rows, cols = _view_windows(images.shape[-1], size, images.device)  # (10, size) each
    b = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    views = images[b, :, rows[None, :, :, None], cols[None, :, None, :]]  # (B, 10, size, size, 3)
    return normalize(views.permute(0, 1, 4, 2, 3), mean_crop)


_VIEW_WINDOWS: dict = {}  # (S, size, device) → the ten views' rows and columns there


def _view_windows(s: int, size: int, device) -> tuple[Tensor, Tensor]:
    """The ten views' source rows and columns on ``device``, made there once: a tensor made from
    a Python list is a blocking copy to a GPU, a wait for the device at every batch."""
    key = (s, size, torch.device(device))
    if key not in _VIEW_WINDOWS:
        oy = torch.tensor([y * (s - size) // BORDER for y, _ in VIEW_OFFSETS] * 2)
        ox = torch.tensor([x * (s - size) // BORDER for _, x in VIEW_OFFSETS] * 2)
        rows, cols = _windows(oy, ox, torch.arange(10) >= 5, size)
        _VIEW_WINDOWS[key] = (rows.to(device), cols.to(device))
    return _VIEW_WINDOWS[key]


def ten_views(images: Tensor, mean_crop: Tensor, size: int = CROP) -> Tensor:
    """(B, 3, S, S) → (B, 10, 3, size, size): :data:`VIEW_OFFSETS` as-is, then each flipped."""
    s = images.shape[-1]
    offsets = [(y * (s - size) // BORDER, x * (s - size) // BORDER) for y, x in VIEW_OFFSETS]
    views = [images[:, :, y:y + size, x:x + size] for y, x in offsets]
    views += [v.flip(-1) for v in views]
    return normalize(torch.stack(views, 1), mean_crop)
