"""CIFAR-10-C corruptions: every corruption's defining property on small synthetic batches,
plus shape/dtype/range, determinism, references (Pillow, scipy, matplotlib HSV) and errors."""

import io

import numpy as np
import pytest
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image
from scipy.ndimage import zoom as scipy_zoom

from hahnet.eval import corruptions as C
from hahnet.eval.corruptions import NAMES, SEVERITIES, corrupt

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
          "motion_blur", "snow", "frost", "fog", "spatter", "elastic_transform"}
BLURS = ("defocus_blur", "gaussian_blur", "motion_blur", "zoom_blur", "glass_blur")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def noise_images():
    return torch.rand(6, 3, 32, 32, generator=_gen(0))


@pytest.fixture(scope="module")
def smooth_images():
    g = _gen(1)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = torch.rand(6, 3, 1, 1, generator=g) * 6.28
    freq = 0.2 + 0.3 * torch.rand(6, 3, 1, 1, generator=g)
    return 0.5 + 0.4 * torch.sin(freq * xx + phase) * torch.cos(0.7 * freq * yy + phase)


def _grey(value, n=8):
    return torch.full((n, 3, 32, 32), float(value))


def _hf(y):
    """High-frequency energy: mean squared finite differences."""
    return (((y[..., 1:, :] - y[..., :-1, :]) ** 2).mean()
            + ((y[..., :, 1:] - y[..., :, :-1]) ** 2).mean()).item()


def _u8_to_float(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------- registry and errors

def test_registry():
    assert len(NAMES) == len(set(NAMES)) == 19
    assert len(C.BENCHMARK) == 15 and C.EXTRA == ("speckle_noise", "gaussian_blur", "spatter",
                                                  "saturate")
    assert set(C.FAMILIES) == {"noise", "blur", "weather", "digital", "extra"}
    assert [len(C.FAMILIES[f]) for f in ("noise", "blur", "weather", "digital")] == [3, 4, 3, 5]
    assert sorted(n for ns in C.FAMILIES.values() for n in ns) == sorted(NAMES)
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert C.family_of("frost") == "weather" and C.family_of("saturate") == "extra"


@pytest.mark.parametrize("name", ["gauss_noise", "", "Fog"])
def test_unknown_name_raises(name):
    with pytest.raises(ValueError, match=r"unknown corruption .*accepted: gaussian_noise") as e:
        corrupt(_grey(0.5, 1), name, 1)
    assert repr(name) in str(e.value)
    with pytest.raises(ValueError):
        C.family_of(name)
    with pytest.raises(ValueError, match="unknown corruption"):
        next(C.corrupt_dataset(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [name]))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3", None])
def test_bad_severity_raises(severity):
    with pytest.raises(ValueError, match=r"severity must be one of \(1, 2, 3, 4, 5\)") as e:
        corrupt(_grey(0.5, 1), "fog", severity)
    assert repr(severity) in str(e.value)


@pytest.mark.parametrize("bad", [torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32),
                                 torch.zeros(1, 3, 32, 32, dtype=torch.uint8)])
def test_bad_images_raise(bad):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        corrupt(bad, "contrast", 1)


# ----------------------------------------------------------------- all corruptions

@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_determinism(name, noise_images):
    x = noise_images[:4]
    for severity in SEVERITIES:
        y = corrupt(x, name, severity, seed=3)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x), (name, severity)
        assert torch.equal(y, corrupt(x, name, severity, seed=3)), "same seed, same output"
        other = corrupt(x, name, severity, seed=4)
        if name in RANDOM:
            assert not torch.equal(y, other), "different seed, different output"
        else:
            assert torch.equal(y, other), "deterministic corruption ignores the seed"
    assert torch.equal(x, noise_images[:4]), "input untouched"
    y64 = corrupt(x.double(), name, 3)
    assert y64.dtype == torch.float64 and y64.shape == x.shape
    assert corrupt(x[:0], name, 1).shape == (0, 3, 32, 32)


def test_random_draws_use_private_generator(noise_images):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    corrupt(noise_images, "gaussian_noise", 2)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------- noise

@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_std(severity):
    sigma = C._PARAMS["gaussian_noise"][severity - 1]
    diff = corrupt(_grey(0.5), "gaussian_noise", severity) - 0.5
    assert abs(diff.std().item() - sigma) < 0.03 * sigma
    assert abs(diff.mean().item()) < 0.1 * sigma


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_variance_scales_with_intensity(severity):
    c = C._PARAMS["shot_noise"][severity - 1]
    variances = []
    for level in (0.2, 0.6):
        y = corrupt(_grey(level), "shot_noise", severity)
        assert abs(y.mean().item() - level) < 0.01
        variances.append(y.var().item())
        assert abs(variances[-1] - level / c) < 0.08 * level / c  # Poisson: var = x / c
    assert 2.5 < variances[1] / variances[0] < 3.5


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_fraction(severity):
    amount = C._PARAMS["impulse_noise"][severity - 1]
    y = corrupt(_grey(0.5, 16), "impulse_noise", severity)
    changed = y != 0.5
    frac = changed.float().mean().item()
    assert abs(frac - amount) < 0.1 * amount + 0.002
    values = y[changed]
    assert ((values == 0) | (values == 1)).all()
    assert abs((values == 1).float().mean().item() - 0.5) < 0.1  # half salt, half pepper


@pytest.mark.parametrize("severity", SEVERITIES)
def test_speckle_noise_is_multiplicative(severity):
    c = C._PARAMS["speckle_noise"][severity - 1]
    for level in (0.2, 0.5):
        diff = corrupt(_grey(level), "speckle_noise", severity) - level
        assert abs(diff.std().item() - c * level) < 0.05 * c * level
    assert torch.equal(corrupt(_grey(0.0, 2), "speckle_noise", severity), _grey(0.0, 2))


# ----------------------------------------------------------------- blurs

@pytest.mark.parametrize("name", BLURS + ("pixelate",))
def test_blurs_keep_constants_and_mean(name, noise_images):
    for severity in SEVERITIES:
        const = _grey(0.3, 2)
        tol = 2.0 / 255 if name == "glass_blur" else 1e-5  # glass: uint8 truncation step
        assert (corrupt(const, name, severity) - const).abs().max() <= tol
        y = corrupt(noise_images, name, severity)
        assert abs(y.mean().item() - noise_images.mean().item()) < 3e-3


@pytest.mark.parametrize("name", ["defocus_blur", "gaussian_blur", "zoom_blur", "pixelate"])
def test_blur_high_frequency_energy_decreases_with_severity(name, noise_images):
    energies = [_hf(corrupt(noise_images, name, s)) for s in SEVERITIES]
    assert _hf(noise_images) > energies[0]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


def test_motion_blur_high_frequency_energy(noise_images):
    # severities 3 and 4 are (radius 6, sigma 2) and (8, 2): the extra taps weigh
    # exp(-169/8) ~ 1e-9, so they are the same blur up to the random angles.
    energies = [_hf(corrupt(noise_images, "motion_blur", s)) for s in SEVERITIES]
    assert _hf(noise_images) > energies[0] > energies[1] > energies[2] > energies[4]
    assert energies[4] < energies[3] < 1.15 * energies[2]


def test_motion_blur_is_a_one_sided_line():
    x = torch.zeros(4, 3, 32, 32)
    x[:, :, 16, 16] = 1.0
    y = corrupt(x, "motion_blur", 5, seed=1)
    assert torch.allclose(y.sum(dim=(2, 3)), torch.ones(4, 3), atol=1e-5)  # mass kept
    for img in y[:, 0]:
        rows, cols = torch.nonzero(img > 1e-4, as_tuple=True)
        # ImageMagick: output(p) = sum_i k_i in(p + offset_i), so a dot is smeared to
        # p - offset_i: all of the trail is on one side of the dot, within 45 degrees
        # of the horizontal
        assert (cols <= 16).all() or (cols >= 16).all()
        assert ((rows - 16).abs() <= (cols - 16).abs() + 1).all()
        assert img[16, 16] == img.max()


def test_defocus_kernels():
    for radius, blur in C._PARAMS["defocus_blur"]:
        k = C._disk_kernel(radius, blur)
        assert abs(k.sum() - 1) < 1e-12 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    # radius 1.5 -> aliased 3x3 box; radius 1 -> plus-shaped 5-pixel disk
    assert np.allclose(C._disk_kernel(1.5, 0.1), 1 / 9, atol=1e-6)
    plus = C._disk_kernel(1, 0.2)
    r = plus.shape[0] // 2
    assert np.allclose(plus[r, r], 0.2, atol=1e-4) and np.allclose(plus[r - 1, r], 0.2, atol=1e-4)
    assert plus[r - 1, r - 1] < 1e-4


@pytest.mark.parametrize("zoom", [1.0, 1.03, 1.1, 1.17, 1.25])
def test_clipped_zoom_matches_scipy(zoom):
    img = np.random.default_rng(0).random((32, 32))
    ch = int(np.ceil(32 / zoom))
    top = (32 - ch) // 2
    ref = scipy_zoom(img[top:top + ch, top:top + ch], zoom, order=1)
    trim = (ref.shape[0] - 32) // 2
    ref = ref[trim:trim + 32, trim:trim + 32]
    ours = C._clipped_zoom(torch.from_numpy(img)[None, None], zoom)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_zoom_blur_changes_more_with_severity(smooth_images):
    changes = [(corrupt(smooth_images, "zoom_blur", s) - smooth_images).pow(2).mean().item()
               for s in SEVERITIES]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes


def test_glass_blur_shuffles(smooth_images):
    def change(s):
        return (corrupt(smooth_images, "glass_blur", s) - smooth_images).pow(2).mean().item()

    changes = [change(s) for s in SEVERITIES]
    # severities 4 and 5 repeat the shuffles of 2 and 3 (same sigma) twice
    assert changes[3] > 1.2 * changes[1] and changes[4] > 1.2 * changes[2], changes
    # severity 1 (sigma 0.05: no blur) is a pure permutation of the uint8-truncated pixels
    x = smooth_images
    y = corrupt(x, "glass_blur", 1)
    base = torch.floor(x * 255) / 255
    for a, b in zip(y.reshape(6, 3, -1).transpose(1, 2), base.reshape(6, 3, -1).transpose(1, 2)):
        assert torch.equal(torch.sort(a[:, 0])[0], torch.sort(b[:, 0])[0])
    # pixels move only locally: each output pixel comes from a nearby source on average
    assert (y - base).abs().mean() < 0.5 * (base - base.roll(5, -1)).abs().mean()


# ----------------------------------------------------------------- digital

@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_equals_pillow(severity):
    quality = C._PARAMS["jpeg_compression"][severity - 1]
    x = torch.from_numpy(np.random.default_rng(severity).integers(0, 256, (3, 32, 32, 3),
                                                                  dtype=np.uint8))
    ref = []
    for img in x.numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        ref.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    y = corrupt(_u8_to_float(x.numpy()), "jpeg_compression", severity)
    assert torch.equal(torch.round(y * 255).to(torch.uint8), _u8_to_float(np.stack(ref))
                       .mul(255).round().to(torch.uint8))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_blocks_and_pillow(severity, noise_images):
    c = C._PARAMS["pixelate"][severity - 1]
    small = int(32 * c)
    y = corrupt(noise_images, "pixelate", severity)
    for img in y:
        cols = torch.unique(img.transpose(0, 2).reshape(32, -1), dim=0)
        rows = torch.unique(img.transpose(0, 1).reshape(32, -1), dim=0)
        assert cols.shape[0] == small and rows.shape[0] == small
        # constant blocks: consecutive equal columns form runs of ceil(32/small) at most
        same = (img[:, :, 1:] == img[:, :, :-1]).all(dim=(0, 1))
        assert int(same.sum()) == 32 - small
    u8 = np.random.default_rng(severity).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ref = np.stack([np.asarray(Image.fromarray(a).resize((small, small), Image.BOX)
                               .resize((32, 32), Image.BOX)) for a in u8])
    diff = corrupt(_u8_to_float(u8), "pixelate", severity) - _u8_to_float(ref)
    assert diff.abs().max() <= 1.01 / 255  # Pillow rounds to uint8 after each pass


def test_pixelate_block_size_integer_ratio():
    # the block structure at an integer ratio: 32 -> 16 -> 32 gives 2x2 constant blocks
    x = torch.rand(2, 3, 32, 32, generator=_gen(5))
    down = torch.from_numpy(C._pil_box_matrix(32, 16)).float()
    up = torch.from_numpy(C._pil_box_matrix(16, 32)).float()
    y = (up @ down) @ x @ (up @ down).T
    blocks = y.reshape(2, 3, 16, 2, 16, 2)
    assert torch.allclose(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert torch.allclose(blocks[:, :, :, 0, :, 0], _avg2(x), atol=1e-6)


def _avg2(x):
    return torch.nn.functional.avg_pool2d(x, 2)


def _hsv_reference(x, edit):
    hsv = rgb_to_hsv(x.permute(0, 2, 3, 1).double().numpy())
    edit(hsv)
    return torch.from_numpy(np.clip(hsv_to_rgb(hsv), 0, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness(severity, noise_images):
    c = C._PARAMS["brightness"][severity - 1]
    x = noise_images.double()
    x[0, :, :4] = 0.5  # grey
    x[0, :, 4:8] = 0.0  # black
    y = corrupt(x, "brightness", severity)

    def edit(hsv):
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)

    assert torch.allclose(y, _hsv_reference(x, edit), atol=1e-9)
    v, v_new = x.amax(1), y.amax(1)
    assert torch.allclose(v_new, (v + c).clamp(max=1), atol=1e-9)  # HSV value up by c
    assert y.mean() > x.mean()


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast(severity, smooth_images):
    c = C._PARAMS["contrast"][severity - 1]
    y = corrupt(smooth_images, "contrast", severity)
    assert torch.allclose(y.mean(dim=(2, 3)), smooth_images.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(y.std(dim=(2, 3)), c * smooth_images.std(dim=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_saturate(severity, noise_images):
    a, b = C._PARAMS["saturate"][severity - 1]
    x = noise_images.double()
    x[0, :, :4] = 0.5  # grey pixels: skimage's hue 0 makes them reddish when b > 0
    y = corrupt(x, "saturate", severity)

    def edit(hsv):
        hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)

    assert torch.allclose(y, _hsv_reference(x, edit), atol=1e-9)

    def saturation(t):
        v = t.amax(1)
        return ((v - t.amin(1)) / v.clamp_min(1e-12)).mean().item()

    if severity <= 2:
        assert saturation(y) < saturation(x)
    else:
        assert saturation(y) > saturation(x)
    assert torch.allclose(y.amax(1), x.amax(1), atol=1e-9)  # HSV value unchanged


def _elastic_coordinates(severity, seed=0):
    """Map each output pixel back to its source via linear ramps (bilinear is exact on them)."""
    yy, xx = torch.meshgrid(torch.arange(32.0, dtype=torch.float64),
                            torch.arange(32.0, dtype=torch.float64), indexing="ij")
    ramps = torch.stack([xx / 64 + 0.25, yy / 64 + 0.25, 0 * xx + 0.5])[None].expand(8, -1, -1, -1)
    y = corrupt(ramps.contiguous(), "elastic_transform", severity, seed=seed)
    inner = slice(10, 22)
    src_x, src_y = (y[:, 0] - 0.25) * 64, (y[:, 1] - 0.25) * 64
    return src_x[:, inner, inner], src_y[:, inner, inner], xx[inner, inner], yy[inner, inner]


def test_elastic_transform_is_affine_plus_growing_local_warp():
    residuals = []
    for severity in SEVERITIES:
        sx, sy, xx, yy = _elastic_coordinates(severity)
        design = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.ones(xx.numel(),
                                                                          dtype=xx.dtype)], 1)
        res = 0.0
        for target in (sx, sy):
            t = target.reshape(8, -1, 1)
            coef = torch.linalg.lstsq(design[None].expand(8, -1, -1), t).solution
            res += (t - design @ coef).pow(2).mean().item()
        residuals.append(res ** 0.5)
        # the affine part moves pixels by at most a few pixels (jitter <= 0.08*32)
        assert (sx - xx).abs().max() < 8 and (sy - yy).abs().max() < 8
    # severity 1 is a pure affine warp (alpha 0); the local elastic part grows from 2 to 5
    assert residuals[0] < 1e-6
    assert all(a < b for a, b in zip(residuals[1:], residuals[2:])), residuals
    assert residuals[4] > 0.2


# ----------------------------------------------------------------- weather and spatter

def test_fog_adds_growing_smooth_haze(noise_images):
    v = 0.5
    amplitudes = []
    for severity in SEVERITIES:
        strength = C._PARAMS["fog"][severity - 1][0]
        y = corrupt(_grey(v), "fog", severity)
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # grey haze
        # out = (x + strength * plasma) * max / (max + strength), plasma in [0, 1]
        plasma = (y[:, 0] * (v + strength) / v - v) / strength
        assert torch.allclose(plasma.amin(dim=(1, 2)), torch.zeros(8), atol=1e-5)
        assert torch.allclose(plasma.amax(dim=(1, 2)), torch.ones(8), atol=1e-5)
        assert _hf(plasma) < 0.5 * _hf(torch.rand(8, 32, 32, generator=_gen(9)))  # smooth
        amplitudes.append((y.amax(dim=(1, 2, 3)) - y.amin(dim=(1, 2, 3))).mean().item())
    assert all(a < b for a, b in zip(amplitudes, amplitudes[1:])), amplitudes
    # fog washes out the image: its contrast shrinks by max / (max + strength)
    x = noise_images
    y = corrupt(x, "fog", 5)
    assert y.std() < x.std()


def test_frost_texture_blend():
    black = torch.zeros(8, 3, 32, 32)
    for severity in SEVERITIES:
        w = C._PARAMS["frost"][severity - 1][1]
        tex = corrupt(black, "frost", severity) / w
        assert tex.max() <= 1 + 1e-6 and 0.3 < tex.mean() < 0.65
        assert tex[:, 2].mean() > tex[:, 0].mean()  # icy blue-white tint
        assert tex.std() > 0.1
    white = torch.ones(4, 3, 32, 32)
    keep = C._PARAMS["frost"][4][0]
    assert corrupt(white, "frost", 5).min() >= keep - 1e-6


def test_snow_brightens_with_streaks(smooth_images):
    means = [corrupt(smooth_images, "snow", s).mean().item() for s in SEVERITIES]
    assert all(m > smooth_images.mean().item() for m in means)
    assert means[4] > means[0]
    layer = corrupt(_grey(0.0), "snow", 5) - corrupt(_grey(0.0), "snow", 5).amin()
    assert torch.equal(layer[:, 0], layer[:, 1])  # white flakes


def test_spatter_water_and_mud():
    grey = _grey(0.4)
    for severity in (1, 2, 3):  # pale turquoise water adds more green/blue than red
        d = corrupt(grey, "spatter", severity) - grey
        assert (d >= -1e-7).all() and d.max() > 0
        assert d[:, 1].sum() > d[:, 0].sum() and torch.allclose(d[:, 1], d[:, 2])
    mud = torch.tensor([63, 42, 20]) / 255
    for severity in (4, 5):  # mud: pixels blended towards brown
        y = corrupt(grey, "spatter", severity)
        changed = (y - grey).abs().sum(1) > 1e-6
        assert changed.any()
        toward = (y - grey).permute(0, 2, 3, 1)[changed] / (mud - 0.4)
        assert (toward > 0).all() and (toward <= 1 + 1e-5).all()


# ----------------------------------------------------------------- uint8 helpers

def test_corrupt_uint8_and_dataset():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=_gen(2))
    y = C.corrupt_uint8(x, "gaussian_noise", 3, seed=1)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    ref = torch.round(corrupt(x.float() / 255, "gaussian_noise", 3, seed=1) * 255).to(torch.uint8)
    assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt_uint8(x.float(), "fog", 1)
    out = list(C.corrupt_dataset(x, ["contrast", "shot_noise"], [1, 5], seed=0, batch_size=2))
    assert [(n, s) for n, s, _ in out] == [("contrast", 1), ("contrast", 5),
                                          ("shot_noise", 1), ("shot_noise", 5)]
    for name, sev, images in out:
        assert images.dtype == torch.uint8 and images.shape == x.shape
    again = list(C.corrupt_dataset(x, ["contrast", "shot_noise"], [1, 5], seed=0, batch_size=2))
    assert all(torch.equal(a[2], b[2]) for a, b in zip(out, again))
    # deterministic corruptions do not depend on the batching
    assert torch.equal(out[0][2], C.corrupt_uint8(x, "contrast", 1))
    with pytest.raises(ValueError, match="severity"):
        list(C.corrupt_dataset(x, ["fog"], [0]))
