"""Hostile and unusual image files: high bit depth is windowed (pixel statistics asserted), EXIF orientation is
applied, and broken files are named errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medeyes_env.cases import displayed_size, load_image_file, window_to_uint8
from medeyes_env.errors import ImageLoadError
from medeyes_env.sources.rows import image_size


def _ramp(dtype, low, high, width=256, height=16):
    return np.tile(np.linspace(low, high, width).astype(dtype), (height, 1))


@pytest.mark.parametrize(
    ("name", "values", "mode"),
    [
        ("ramp16.png", _ramp(np.uint16, 0, 65535), "I;16"),
        ("ramp12.png", _ramp(np.uint16, 0, 4095), "I;16"),
        ("ramp16.tiff", _ramp(np.uint16, 1000, 3000), "I;16"),
        ("hounsfield.tiff", _ramp(np.float32, -1000, 3000), "F"),
        ("int32.tiff", _ramp(np.int32, -70000, 70000), "I"),
    ],
)
def test_high_bit_depth_images_are_windowed_min_max_not_clipped(tmp_path, name, values, mode):
    path = tmp_path / name
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    pixels = np.asarray(load_image_file(path))
    assert pixels.shape == (16, 256, 3) and pixels.dtype == np.uint8
    gray = pixels[0, :, 0]
    assert gray[0] == 0 and gray[-1] == 255 and np.all(np.diff(gray.astype(int)) >= 0)
    assert abs(pixels.mean() - 127.5) < 0.6  # before the fix: 254 for the 16-bit ramp (all but column 0 white)
    assert len(np.unique(gray)) >= 250  # a ramp stays a ramp


def test_percentile_window_ignores_a_few_hot_pixels(tmp_path):
    values = _ramp(np.uint16, 0, 4095, height=64)
    values[0, :8] = 65535  # 8 saturated detector pixels out of 16384
    path = tmp_path / "hot.png"
    Image.fromarray(values).save(path)
    minmax = np.asarray(load_image_file(path))[1:, :, 0]
    robust = np.asarray(load_image_file(path, window="percentile"))[1:, :, 0]
    assert minmax.max() == 16  # the ramp squeezed into 6% of the range by the hot pixels
    assert robust.max() == 255 and robust.min() == 0 and 120 < robust.mean() < 135


def test_nan_and_flat_images():
    values = np.array([[np.nan, 0.0, 1.0]], dtype=np.float32)
    assert window_to_uint8(values).tolist() == [[0, 0, 255]]
    assert window_to_uint8(np.full((2, 2), 65535, np.uint16), nominal_max=65535).tolist() == [[255, 255]] * 2
    assert window_to_uint8(np.zeros((1, 2), np.uint16), nominal_max=65535).tolist() == [[0, 0]]
    assert window_to_uint8(np.full((1, 2), np.nan)).tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="window 'auto' is not one of minmax, percentile"):
        window_to_uint8(values, "auto")


def test_eight_bit_images_are_unchanged(tmp_path):
    values = _ramp(np.uint8, 0, 255)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert np.array_equal(np.asarray(load_image_file(tmp_path / "g.png"))[..., 0], values)


def test_exif_orientation_is_applied_so_boxes_are_on_the_displayed_image(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[0:4, 0:4] = 255  # a white block at the stored top-left
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    loaded = load_image_file(path)
    assert loaded.size == (20, 40) == image_size(path) == displayed_size(Image.open(path))
    pixels = np.asarray(loaded)[..., 0]
    assert pixels[:4, -4:].mean() > 200 and pixels[:4, :4].mean() < 50  # top-left went to the top-right


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"cannot read image .*empty.png: cannot identify image file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, r"cannot read image .*empty.png"),
    ],
)
def test_corrupt_image_is_a_named_error(tmp_path, content, message):
    (tmp_path / "empty.png").write_bytes(content)
    with pytest.raises(ImageLoadError, match=message):
        load_image_file(tmp_path / "empty.png")


def test_directory_and_bomb_images_are_named_errors(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageLoadError, match=r"image file not found: .*dir.png"):
        load_image_file(tmp_path / "dir.png")
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 2 kB on disk, 81 Mpx decoded
    with pytest.raises(ImageLoadError, match=r"bomb.png is 9000x9000, above the 64,000,000-pixel limit"):
        load_image_file(tmp_path / "bomb.png")


def test_scan_with_more_boxes_than_the_montage_has_pixels_for(tmp_path):
    from medeyes_env.views import scan_view

    image = Image.new("RGB", (256, 256), (90, 90, 90))
    view, shown = scan_view(image, [(0, 0, 10, 10)] * 65, 8, 8)  # 9 x 9 tiles of 0 px: before, ValueError
    assert view.size == (8, 8) and len(shown) == 65
    view, shown = scan_view(image, [(0, 0, 10, 10)] * 500, 16, 8)
    assert view.size == (16, 16) and len(shown) == 500


def float_tiff_header(path, width: int, height: int) -> None:
    """An uncompressed float32 TIFF whose header declares ``width`` x ``height`` but holds 16 bytes of pixels."""
    import struct

    tags = [(256, 4, width), (257, 4, height), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 10 * 12 + 4),
            (277, 3, 1), (278, 4, height), (279, 4, width * height * 4), (339, 3, 3)]  # fmt: skip
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags
    )
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + b"\x00" * 16)


def test_image_whose_decoded_bytes_exceed_the_limit_is_refused_from_its_header(tmp_path):
    # 8000 x 8000 float32 is under the 64 Mpx limit, but 256 MB decoded (it peaked at 3.5 GB while loading)
    float_tiff_header(tmp_path / "huge.tif", 8000, 8000)
    assert (tmp_path / "huge.tif").stat().st_size < 200
    message = r"huge.tif is 8000x8000 F \(4 bytes a pixel\): 256,000,000 bytes decoded, above the 192,000,000-byte"
    with pytest.raises(ImageLoadError, match=message):
        load_image_file(tmp_path / "huge.tif")
    float_tiff_header(tmp_path / "small.tif", 64, 64)  # the same file, small: decoded, and its missing pixels named
    with pytest.raises(ImageLoadError, match=r"cannot read image .*small.tif"):
        load_image_file(tmp_path / "small.tif")
