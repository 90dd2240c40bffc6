"""Write generated videos as H.264 MP4 files through imageio-ffmpeg's bundled ffmpeg."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError
from ..fileio import VIDEO_SUFFIXES, atomic_write

MAX_FPS = 240


def check_fps(fps) -> None:
    """Raise ``InvalidArgumentError('fps', ...)`` unless ``fps`` is a finite number from 1 to ``MAX_FPS``."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(fps) or not 1 <= fps <= MAX_FPS:
        raise InvalidArgumentError("fps", f"must be a number from 1 to {MAX_FPS}, got {fps!r}")


def check_frames(frames) -> np.ndarray:
    """Validate a video as uint8 (frames, height, width, 3) with even height and width; return it C-contiguous."""
    if not isinstance(frames, np.ndarray):
        raise InvalidArgumentError("frames", f"must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise InvalidArgumentError("frames", f"must be uint8 (0-255), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise InvalidArgumentError("frames", f"must have shape (frames, height, width, 3), got {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise InvalidArgumentError(
            "frames", f"H.264 (yuv420p) needs an even height and width, got {height}x{width} (height x width)"
        )
    return np.ascontiguousarray(frames)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 16, quality: float = 5.0) -> Path:
    """Write ``frames`` (uint8, (F, H, W, 3), RGB) to ``path`` as H.264 in yuv420p at ``fps`` frames per second.

    ``quality`` goes from 1 to 10 (imageio's scale, 5 as diffusers' ``export_to_video``). The file is written
    through a temporary file beside ``path``, so a failure leaves nothing half-written behind.
    """
    import imageio_ffmpeg

    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise InvalidArgumentError("path", f"videos are written as {', '.join(VIDEO_SUFFIXES)} files, got '{path.name}'")
    if not path.parent.is_dir():
        raise InvalidArgumentError("path", f"directory does not exist: {path.parent}")
    check_fps(fps)
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 1 <= quality <= 10:
        raise InvalidArgumentError("quality", f"must be a number from 1 to 10, got {quality!r}")
    frames = check_frames(frames)
    height, width = frames.shape[1:3]

    def encode(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=float(fps), quality=quality,
            macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"])
        writer.send(None)
        # imageio-ffmpeg never checks how ffmpeg exited: a full disk would leave a truncated file that looks written
        process = writer.gi_frame.f_locals.get("p") if writer.gi_frame is not None else None
        try:
            for frame in frames:
                writer.send(frame)
        except OSError as exc:
            writer.close()
            if "\n" in str(exc):  # imageio-ffmpeg's report that ffmpeg stopped reading: its command line and more
                raise _ffmpeg_failed(tmp, process) from None
            raise
        writer.close()
        if process is not None and process.returncode != 0:
            raise _ffmpeg_failed(tmp, process)
        if tmp.stat().st_size == 0:
            raise RuntimeError(f"ffmpeg wrote nothing for {path} (see its messages above)")

    return atomic_write(path, encode)


def _ffmpeg_failed(tmp: Path, process) -> OSError:
    """An ``OSError`` for an ffmpeg that failed writing ``tmp``: "No space left on device" when the disk is full."""
    import errno
    import shutil

    try:
        full = shutil.disk_usage(tmp.parent).free < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    status = None if process is None else process.poll()
    return OSError(errno.EIO, f"ffmpeg failed writing the video (exit status {status}; its message is above)")


def read_video_info(path: str | Path) -> tuple[int, int, int, int] | None:
    """``(width, height, frames, fps)`` of a video file from its header (ffmpeg reads no frame), or None when
    ffmpeg cannot read it."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        try:
            meta = next(reader)
        finally:
            reader.close()
        width, height = meta["size"]
        fps = float(meta["fps"])
        return int(width), int(height), max(1, round(float(meta["duration"]) * fps)), max(1, round(fps))
    except Exception:  # noqa: BLE001 - any failure means: not a readable video
        return None
