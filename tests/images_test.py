"""Tests for reading user images: upright, 8-bit RGB, transparency on white, the same everywhere."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gal_jax import data, images, io_utils, report

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def _png16(path: Path, pixels: np.ndarray, colour_type: int, transparent: bytes = b"") -> Path:
    """Writes uint16 pixels (H, W[, C]) as a 16-bit PNG, byte for byte (Pillow writes no 16-bit
    RGB); colour_type 0 is grey, 2 RGB; transparent is the tRNS chunk's data, if any."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + (chunk(b"tRNS", transparent) if transparent else b"")
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_sixteen_bit_grey_png_is_scaled_to_eight_bits_not_white(tmp_path):
    levels = np.arange(256)
    path = tmp_path / "grey16.png"
    Image.fromarray(np.tile(levels * 257, (4, 1)).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = images.read_rgb_array(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 256, 3)
    np.testing.assert_array_equal(pixels, np.broadcast_to(levels[None, :, None], (4, 256, 3)))


def test_sixteen_bit_values_round_to_the_nearest_eight_bit_level(tmp_path):
    raw = np.array([[0, 128, 129, 32767, 32768, 65407, 65408, 65535]], dtype=np.uint16)
    pixels = images.read_rgb_array(_png16(tmp_path / "grey16.png", raw, colour_type=0))
    np.testing.assert_array_equal(pixels[0, :, 0], np.rint(raw[0] / 257))


def test_sixteen_bit_rgb_png_keeps_its_colours(tmp_path):
    raw = np.array([[[65535, 32896, 257], [0, 65535, 0]]], dtype=np.uint16)
    pixels = images.read_rgb_array(_png16(tmp_path / "rgb16.png", raw, colour_type=2))
    np.testing.assert_array_equal(pixels, [[[255, 128, 1], [0, 255, 0]]])


def _transparent_files(tmp_path: Path) -> dict[str, Path]:
    """Returns images, one per kind of transparency, whose left pixel is fully transparent
    (black underneath) and right pixel opaque red (grey 76 for grey images)."""
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 255]]], dtype=np.uint8))
    grey_alpha = Image.fromarray(np.array([[[0, 0], [76, 255]]], dtype=np.uint8))
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putdata([0, 1])
    rgb, grey = Image.new("RGB", (2, 1)), Image.new("L", (2, 1))
    rgb.putdata([(0, 0, 0), RED])
    grey.putdata([0, 76])
    saves = {"RGBA": (rgba, "rgba.png", {}), "LA": (grey_alpha, "la.png", {}),
             "P": (palette, "p.png", {"transparency": 0}),
             "GIF": (palette, "p.gif", {"transparency": 0}),
             "RGB key": (rgb, "rgb_key.png", {"transparency": (0, 0, 0)}),
             "L key": (grey, "l_key.png", {"transparency": 0})}
    files = {}
    for kind, (image, name, options) in saves.items():
        image.save(tmp_path / name, **options)
        files[kind] = tmp_path / name
    files["16-bit key"] = _png16(tmp_path / "grey16_key.png",
                                 np.array([[1000, 19532]], dtype=np.uint16), colour_type=0,
                                 transparent=struct.pack(">H", 1000))
    return files


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "GIF", "RGB key", "L key", "16-bit key"])
def test_transparent_pixels_load_white(tmp_path, kind):
    path = _transparent_files(tmp_path)[kind]
    pixels = images.read_rgb_array(path)
    opaque = (76, 76, 76) if kind in ("LA", "L key", "16-bit key") else RED
    np.testing.assert_array_equal(pixels, [[WHITE, opaque]])


def test_half_transparent_pixels_are_blended_with_white(tmp_path):
    path = tmp_path / "half.png"
    Image.fromarray(np.array([[[255, 0, 0, 128]]], dtype=np.uint8)).save(path)
    np.testing.assert_allclose(images.read_rgb_array(path)[0, 0], (255, 127, 127), atol=1)


def test_cmyk_and_palette_images_are_converted_to_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, quality=100)
    assert Image.open(cmyk).mode == "CMYK"
    np.testing.assert_allclose(images.read_rgb_array(cmyk)[4, 4], RED, atol=6)
    palette = Image.new("P", (2, 1))
    palette.putpalette([*BLUE, *RED])
    palette.putdata([1, 0])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(images.read_rgb_array(tmp_path / "p.png"), [[RED, BLUE]])


def _rotated_jpeg(path: Path, orientation: int) -> np.ndarray:
    """Writes a 64 x 32 JPEG, left half red and right half blue, tagged with an EXIF orientation;
    returns the upright pixels a viewer shows (32 wide, 64 high)."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = RED
    stored[:, 32:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    # 6: the camera was turned right, shown turned back clockwise; 8: the other way.
    return np.rot90(stored, k=-1 if orientation == 6 else 1)


def _as_uint8(unit_range: np.ndarray) -> np.ndarray:
    return np.rint((unit_range + 1.0) * 127.5).astype(np.uint8)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_is_upright_alike_through_every_reader(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    upright = _rotated_jpeg(path, orientation)
    pixels = images.read_rgb_array(path)
    assert pixels.shape == (64, 32, 3)
    assert np.abs(pixels.astype(int) - upright).mean() < 4  # only JPEG's error on the edge
    np.testing.assert_array_equal(io_utils.read_images([path])[0], pixels)
    np.testing.assert_array_equal(np.asarray(report._load_image(tmp_path, path.name, 64)), pixels)
    # Training crops the centre square of the upright image: its top half is the stored left.
    np.testing.assert_array_equal(_as_uint8(data.load_image(path, 32)), pixels[16:48])


def test_report_thumbnail_and_training_image_of_a_sixteen_bit_png_are_not_white(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((32, 32), 100 * 257, dtype=np.uint16)).save(path)
    assert (np.asarray(report._load_image(tmp_path, path.name, 16)) == 100).all()
    assert (_as_uint8(data.load_image(path, 32)) == 100).all()
    assert (io_utils.read_images([path]) == 100).all()


def test_unreadable_files_raise_an_error_naming_them(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (32, 32), RED).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:200])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    for path in (corrupt, not_an_image):
        with pytest.raises(images.ImageError, match=rf"{path.name}: cannot read image"):
            images.read_rgb_array(path)
        with pytest.raises(ValueError, match=path.name):
            io_utils.read_images([good, path])
        with pytest.raises(ValueError, match=path.name):
            report._load_image(tmp_path, path.name, 16)
        with pytest.raises(data.DataError, match=path.name):
            data.load_image(path, 32)


def test_a_missing_file_is_both_file_not_found_and_value_error(tmp_path):
    with pytest.raises(images.ImageNotFoundError, match="nope.png: image file does not") as info:
        images.open_rgb(tmp_path / "nope.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_a_floating_point_image_is_refused_naming_it(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path)
    with pytest.raises(images.ImageError, match=r"float\.tif: .*floating-point"):
        images.open_rgb(path)
