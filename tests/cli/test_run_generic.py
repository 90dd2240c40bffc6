"""`diffc run --model` on pipelines of the generic (diffusers) backend: image and video files, the perf dump."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffc.cli.main import main


def test_image_output_and_perf_dump(generic_checkpoint, tmp_path, capsys):
    out, perf = tmp_path / "cat.png", tmp_path / "perf.json"
    code = main(["run", "--model", str(generic_checkpoint("sd3")), "--prompt", "a calico cat", "--height", "32",
                 "--width", "48", "--steps", "2", "--seed", "5", "--max-sequence-length", "16", "--no-progress",
                 "--negative-prompt", "blurry", "--output", str(out), "--perf-dump-path", str(perf)])
    assert code == 0
    assert f"wrote {out} (48x32, 2 steps, seed 5)" in capsys.readouterr().out
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 48, 3) and image.std() > 0
    dump = json.loads(perf.read_text())
    assert dump["seed"] == 5 and dump["request"]["negative_prompt"] == "blurry"
    assert {"encode_prompt", "denoise", "decode"} <= set(dump["stages"]) and len(dump["step_ms"]) == 2
    assert dump["runtime"]["generic"]["pipeline_class"] == "StableDiffusion3Pipeline"
    assert dump["total_s"] > 0 and dump["load_s"] > 0


def test_step_cache_from_the_command_line(generic_checkpoint, tmp_path, capsys):
    """`--cache fbcache` on a diffusers pipeline: the streams come from its blocks' code; the perf dump says what
    was skipped."""
    video, perf = tmp_path / "waves.mp4", tmp_path / "perf.json"
    code = main(["run", "--model", str(generic_checkpoint("hunyuan")), "--prompt", "waves", "--height", "32",
                 "--width", "32", "--num-frames", "5", "--steps", "5", "--seed", "2", "--max-sequence-length", "16",
                 "--no-progress", "--cache", "fbcache", "--cache-threshold", "100", "--cache-warmup-steps", "2",
                 "--output", str(video), "--perf-dump-path", str(perf)])
    assert code == 0, capsys.readouterr().err
    cache = json.loads(perf.read_text())["runtime"]["cache"]
    assert cache["kind"] == "fbcache" and cache["skipped_steps"] == [2, 3, 4]
    assert video.stat().st_size > 0


def test_video_output(generic_checkpoint, tmp_path, capsys):
    import imageio_ffmpeg

    out = tmp_path / "waves.mp4"
    code = main(["run", "--model", str(generic_checkpoint("hunyuan")), "--prompt", "waves at sunset", "--height", "32",
                 "--width", "32", "--num-frames", "5", "--steps", "2", "--seed", "1", "--max-sequence-length", "16",
                 "--fps", "8", "--no-progress", "--output", str(out)])
    assert code == 0
    assert f"wrote {out} (32x32x5f, 2 steps, seed 1)" in capsys.readouterr().out
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    assert tuple(meta["size"]) == (32, 32) and meta["fps"] == 8 and len(list(reader)) == 5


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "5"], "--num-frames: StableDiffusion3Pipeline does not take num_frames"),
    (["--output", "x.mp4"], "image model writes .png"),
    (["--offload", "model"], "--offload: 'model' offload needs a CUDA GPU"),
    (["--scheduler", "euler"], "--scheduler: 'StableDiffusion3Pipeline' runs on the generic"),
])
def test_errors_exit_2_naming_the_field(generic_checkpoint, tmp_path, capsys, argv, message):
    code = main(["run", "--model", str(generic_checkpoint("sd3")), "--prompt", "a cat", "--steps", "1",
                 "--no-progress", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
