"""A full disk for ffmpeg only: the child process imageio-ffmpeg starts may write at most ``limit_bytes``
per file, so its next write fails (EFBIG) as it would with no space left. The test process is not limited."""

from __future__ import annotations

import resource
import signal
import subprocess
import types


def full_disk_ffmpeg(monkeypatch, limit_bytes: int = 1024) -> None:
    import imageio_ffmpeg._io as ffmpeg_io

    def limited_popen(*args, preexec_fn=None, **kwargs):
        def limit():
            if preexec_fn is not None:
                preexec_fn()
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing ffmpeg
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

        return subprocess.Popen(*args, preexec_fn=limit, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    shim.Popen = limited_popen
    monkeypatch.setattr(ffmpeg_io, "subprocess", shim)
