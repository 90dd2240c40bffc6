"""write_video: H.264 MP4 through imageio-ffmpeg, read back with imageio; every bad input refused cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from diffc.errors import InvalidArgumentError
from diffc.pipelines.base import GenerationOutput
from diffc.pipelines.video import write_video
from diffc.runtime.perf import Timings
from tests.helpers import psnr_uint8

# (frames, height, width): one frame, Wan's 4k+1 counts, non-square, the smallest even size
SHAPES = [(1, 16, 16), (5, 32, 48), (9, 48, 32), (3, 2, 2)]


def smooth_video(frames: int, height: int, width: int) -> np.ndarray:
    """Gradients that move frame to frame: compress well, so a round trip stays close to the input."""
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([x * 200 / max(width - 1, 1) + 20, y * 200 / max(height - 1, 1) + 20, (f * 23) % 200 + 30], axis=-1)
    return rgb.astype(np.uint8)


def read_video(path) -> tuple[np.ndarray, dict]:
    import imageio.v3 as iio

    return iio.imread(path, plugin="FFMPEG"), iio.immeta(path, plugin="FFMPEG")


@pytest.mark.parametrize("frames,height,width", SHAPES)
def test_round_trip(tmp_path, frames, height, width):
    video = smooth_video(frames, height, width)
    path = write_video(tmp_path / "clip.mp4", video, fps=16)
    assert path == tmp_path / "clip.mp4"
    back, meta = read_video(path)
    assert back.shape == video.shape and back.dtype == np.uint8
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 16
    assert meta["size"] == (width, height)
    if height >= 16:  # 2x2 frames are all chroma-subsampling edge
        assert psnr_uint8(back, video) >= 30.0
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind


@pytest.mark.parametrize("fps", [1, 8, 24, 30.0, 60])
def test_fps_is_written(tmp_path, fps):
    _, meta = read_video(write_video(tmp_path / "a.mp4", smooth_video(5, 16, 16), fps=fps))
    assert meta["fps"] == pytest.approx(fps)


def test_overwrites_existing_file_and_accepts_upper_case_suffix(tmp_path):
    path = tmp_path / "A.MP4"
    path.write_bytes(b"old")
    write_video(path, smooth_video(3, 16, 16), fps=8)
    assert read_video(path)[0].shape == (3, 16, 16, 3)


@pytest.mark.parametrize("fps", [0, -1, 241, 0.5, float("nan"), float("inf"), True, "16", None])
def test_bad_fps(tmp_path, fps):
    with pytest.raises(InvalidArgumentError) as info:
        write_video(tmp_path / "a.mp4", smooth_video(3, 16, 16), fps=fps)
    assert info.value.field == "fps" and "from 1 to 240" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frames,fragment", [
    (np.zeros((3, 16, 16, 3), np.float32), "must be uint8"),
    (np.zeros((16, 16, 3), np.uint8), "(frames, height, width, 3)"),
    (np.zeros((3, 16, 16, 4), np.uint8), "(frames, height, width, 3)"),
    (np.zeros((0, 16, 16, 3), np.uint8), "(frames, height, width, 3)"),
    (np.zeros((3, 17, 16, 3), np.uint8), "even height and width, got 17x16"),
    (np.zeros((3, 16, 15, 3), np.uint8), "even height and width"),
    ([[0]], "numpy array"),
])
def test_bad_frames(tmp_path, frames, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        write_video(tmp_path / "a.mp4", frames, fps=16)
    assert info.value.field == "frames" and fragment in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["clip.gif", "clip.png", "clip", "clip.mp4.tmp"])
def test_bad_suffix(tmp_path, name):
    with pytest.raises(InvalidArgumentError, match=r"path: videos are written as \.mp4 files"):
        write_video(tmp_path / name, smooth_video(3, 16, 16), fps=16)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_and_bad_quality(tmp_path):
    with pytest.raises(InvalidArgumentError, match="path: directory does not exist"):
        write_video(tmp_path / "nope" / "a.mp4", smooth_video(3, 16, 16))
    for quality in (0, 11, "high"):
        with pytest.raises(InvalidArgumentError, match="quality: must be a number from 1 to 10"):
            write_video(tmp_path / "a.mp4", smooth_video(3, 16, 16), quality=quality)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_encoding_leaves_nothing_behind(tmp_path, monkeypatch):
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames

    def failing(*args, **kwargs):  # ffmpeg has written part of the file when the 3rd frame fails
        writer = real(*args, **kwargs)
        writer.send(None)
        for _ in range(3):
            writer.send((yield))
        writer.close()
        raise OSError("disk full")

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing)
    target = tmp_path / "a.mp4"
    target.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        write_video(target, smooth_video(9, 16, 16), fps=16)
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"] and target.read_bytes() == b"previous"


def test_generation_output_frames_and_save(tmp_path):
    videos = [smooth_video(5, 16, 32), smooth_video(9, 32, 16)]
    out = GenerationOutput(images=None, videos=videos, timings=Timings(device="cpu"), seeds=[1, 2], warnings=[])
    assert out.frames is videos[0]
    path = out.save(tmp_path / "second.mp4", index=1, fps=12)
    back, meta = read_video(path)
    assert back.shape == (9, 32, 16, 3) and meta["fps"] == 12
    with pytest.raises(InvalidArgumentError) as info:
        out.save(tmp_path / "x.mp4", fps=0)
    assert info.value.field == "fps"
    with pytest.raises(InvalidArgumentError) as info:
        out.save(tmp_path / "x.avi")
    assert info.value.field == "path"
    with pytest.raises(InvalidArgumentError, match="index: must be an integer from 0 to 1, got 2"):
        out.save(tmp_path / "x.mp4", index=2)


def _image_output(count: int = 2) -> GenerationOutput:
    from PIL import Image

    images = [Image.fromarray(smooth_video(1, 16, 24)[0]) for _ in range(count)]
    return GenerationOutput(images=images, videos=None, timings=Timings(device="cpu"), seeds=list(range(count)),
                            warnings=[])


@pytest.mark.parametrize("name,fmt", [("a.png", "PNG"), ("a.JPG", "JPEG"), ("a.jpeg", "JPEG"), ("a.webp", "WEBP")])
def test_an_image_is_saved_in_the_format_its_suffix_names(tmp_path, name, fmt):
    from PIL import Image

    path = _image_output().save(tmp_path / name, index=1)
    with Image.open(path) as back:
        assert back.format == fmt and back.size == (24, 16)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name,field,message", [
    ("keep.xbm", "path", "images are written as .png, .jpg, .jpeg, .webp files, got 'keep.xbm'"),
    ("keep.txt", "path", "got 'keep.txt'"),
    ("keep", "path", "got 'keep'"),
    ("folder.png", "path", "is a directory; give a file name"),
])
def test_saving_an_image_under_a_name_it_cannot_have_leaves_the_file_alone(tmp_path, name, field, message):
    """Refused before anything is written: a file of the user's under that name keeps its bytes."""
    target = tmp_path / name
    if name == "folder.png":
        target.mkdir()
    else:
        target.write_text("precious")
    with pytest.raises(InvalidArgumentError, match=message) as info:
        _image_output().save(target)
    assert info.value.field == field
    if name != "folder.png":
        assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_saving_an_image_fails_cleanly(tmp_path, monkeypatch):
    """A bad index is named; a missing folder is one OutputError line; a failing encoder leaves the old file."""
    from PIL import Image

    from diffc.errors import OutputError

    out = _image_output()
    for index in (2, -1, 1.0, True):
        with pytest.raises(InvalidArgumentError, match=f"index: must be an integer from 0 to 1, got {index!r}"):
            out.save(tmp_path / "a.png", index=index)
    with pytest.raises(OutputError, match="nowhere"):
        out.save(tmp_path / "nowhere" / "a.png")
    target = tmp_path / "a.png"
    target.write_bytes(b"previous")

    def failing(self, fp, format=None, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        out.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and target.read_bytes() == b"previous"
