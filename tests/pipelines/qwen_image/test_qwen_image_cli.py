"""``diffc run`` on the tiny Qwen-Image-Edit-2509 checkpoint: two --image files, --true-cfg-scale, a clear error."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from diffc.cli.main import main

from .test_qwen_image_edit import picture, small_plus_sizes  # noqa: F401, F811 (fixture)


def test_run_edit_with_two_images(qwen_checkpoint, small_plus_sizes, tmp_path, capsys):  # noqa: F811
    path, _ = qwen_checkpoint("edit_plus")
    inputs = []
    for i, size in enumerate(((24, 40), (40, 24))):
        inputs += ["--image", str(tmp_path / f"in{i}.png")]
        picture(*size, i).save(tmp_path / f"in{i}.png")
    out, perf = tmp_path / "out.png", tmp_path / "perf.json"
    code = main(["run", "--model", str(path), "--prompt", "make it night", *inputs, "--negative-prompt", " ",
                 "--true-cfg-scale", "3", "--height", "32", "--width", "32", "--steps", "2", "--seed", "1",
                 "--output", str(out), "--perf-dump-path", str(perf), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    dump = json.loads(perf.read_text())
    assert dump["request"]["true_cfg_scale"] == 3.0 and len(dump["stages"]) == 7


def test_run_edit_without_image_is_one_clear_line(qwen_checkpoint, tmp_path, capsys):
    path, _ = qwen_checkpoint("edit")
    code = main(["run", "--model", str(path), "--prompt", "make it night", "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "image: QwenImageEditPipeline needs an input image" in err and "Traceback" not in err
