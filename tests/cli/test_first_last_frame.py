"""`diffc run` and `diffc compile` with a first and a last frame (Wan2.1 FLF2V, Wan2.2 I2V-A14B).

``--image FIRST --last-image LAST`` (or a second ``--image``) is the Python API's ``image=[first, last]``
(diffusers' ``last_image``, matched against diffusers in tests/pipelines/test_wan_i2v.py); a last frame a
checkpoint cannot read, or one missing where it needs one, is one line naming the flag. A compile of an FLF2V
checkpoint runs its example request with both frames (its DiT reads both frames' image tokens)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import diffc
from diffc.cli.main import main
from tests.pipelines.conftest import save_wan_variant

pytest.importorskip("diffusers")

SIZE = ["--height", "16", "--width", "16", "--num-frames", "5", "--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(kind) -> Path``: the tiny ``flf2v`` and ``i2v`` checkpoints, built once for the module."""
    built = {}

    def get(kind: str):
        if kind not in built:
            built[kind] = save_wan_variant(kind, tmp_path_factory.mktemp(f"wan-{kind}"))
        return built[kind]

    return get


@pytest.fixture
def frames(tmp_path):
    """Two input pictures of other sizes than the video (both are resized to it)."""
    paths = []
    for i, size in enumerate([(40, 24), (56, 24)]):
        rng = np.random.default_rng(i + 3)
        Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR) \
            .save(tmp_path / f"frame-{i}.png")
        paths.append(tmp_path / f"frame-{i}.png")
    return paths


def _read(path) -> list[np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_last_image_is_the_python_apis_last_frame(checkpoints, frames, tmp_path, capsys):
    ckpt = checkpoints("flf2v")
    first, last = frames
    out = tmp_path / "flf.mp4"
    assert main(["run", "--model", str(ckpt), "--prompt", "a fox", "--image", str(first), "--last-image", str(last),
                 "--output", str(out), *SIZE]) == 0
    assert f"wrote {out} (16x16x5f, 2 steps, seed 3)" in capsys.readouterr().out
    want = diffc.load(ckpt, device="cpu").generate(
        "a fox", image=[Image.open(first), Image.open(last)], height=16, width=16, num_frames=5,
        num_inference_steps=2, seed=3, progress=False)
    want.save(tmp_path / "want.mp4", fps=16)
    video = _read(out)
    assert len(video) == 5 and _same(video, _read(tmp_path / "want.mp4"))
    # a second --image is the same request
    assert main(["run", "--model", str(ckpt), "--prompt", "a fox", "--image", str(first), "--image", str(last),
                 "--output", str(tmp_path / "two.mp4"), *SIZE]) == 0
    assert _same(_read(tmp_path / "two.mp4"), video)


def test_the_python_api_takes_diffusers_last_image_keyword(checkpoints, frames):
    """``generate(image=FIRST, last_image=LAST)`` (diffusers' keyword) is ``image=[FIRST, LAST]``; a last image
    without one first image, or for a checkpoint that reads none, is refused naming ``last_image``; None is no last
    frame."""
    from diffc.errors import InvalidArgumentError

    flf2v = diffc.load(checkpoints("flf2v"), device="cpu")
    first, last = (Image.open(p) for p in frames)
    args = dict(height=16, width=16, num_frames=5, num_inference_steps=2, seed=3, progress=False)
    joined = flf2v.generate("a fox", image=first, last_image=last, **args).videos[0]
    listed = flf2v.generate("a fox", image=[first, last], **args).videos[0]
    assert np.array_equal(joined, listed)
    assert flf2v.resolve(prompt="a fox", image=[first], last_image=last).image == [first, last]
    for image in (None, [first, last]):
        with pytest.raises(InvalidArgumentError, match=r"^last_image: goes with one image, the first frame"):
            flf2v.resolve(prompt="a fox", image=image, last_image=last)
    with pytest.raises(InvalidArgumentError, match=r"^image: this first-last-frame checkpoint .* needs a first and a "
                                                   r"last frame"):
        flf2v.resolve(prompt="a fox", image=first, last_image=None, num_frames=5)
    i2v = diffc.load(checkpoints("i2v"), device="cpu")
    with pytest.raises(InvalidArgumentError, match=r"^last_image: this checkpoint takes one image, the first frame"):
        i2v.resolve(prompt="a fox", image=first, last_image=last)
    from diffc.demo import demo_checkpoint

    demo = diffc.load(demo_checkpoint("flux"), device="cpu")  # the text-to-image demo
    with pytest.raises(InvalidArgumentError, match=r"^last_image: FluxPipeline takes no last frame"):
        demo.resolve(prompt="a fox", last_image=last)


@pytest.mark.parametrize("kind, flags, fragment", [
    ("flf2v", ["--image", "@0"], "--last-image: this first-last-frame checkpoint (pos_embed_seq_len) needs a first "
                                "and a last frame: give --image FIRST --last-image LAST"),
    ("i2v", ["--image", "@0", "--last-image", "@1"], "--last-image: this checkpoint takes one image, the first frame: "
                                                   "a last frame needs a first-last-frame checkpoint"),
    ("i2v", ["--image", "@0", "--image", "@1"], "--image: this checkpoint takes one image, the first frame: a last "
                                              "frame needs a first-last-frame checkpoint"),
    ("flf2v", ["--image", "@0", "--last-image", "@1", "--num-frames", "1"],
     "--num-frames: a first and a last frame need at least 5 frames, got 1"),
    ("flf2v", ["--image", "@0", "--last-image", "@missing"], "--last-image: file not found:"),
])
def test_a_last_frame_the_checkpoint_cannot_take_is_one_line(checkpoints, frames, tmp_path, capsys, kind, flags,
                                                             fragment):
    named = {"@0": str(frames[0]), "@1": str(frames[1]), "@missing": str(tmp_path / "missing.png")}
    argv = ["run", "--model", str(checkpoints(kind)), "--prompt", "a fox", "--output", str(tmp_path / "x.mp4"),
            *SIZE, *[named.get(f, f) for f in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"diffc run: error: {fragment}" in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--last-image", "@1"], "--last-image: needs the first frame too: --image FIRST --last-image LAST"),
    (["--image", "@0", "--image", "@0", "--last-image", "@1"], "--last-image: goes with one --image (the first "
                                                            "frame), got 2 --image files"),
    (["--image", "@0", "--last-image", " "], "--last-image: is empty; give an image file"),
])
def test_last_image_flag_mistakes_are_refused_before_loading(frames, tmp_path, capsys, monkeypatch, flags, fragment):
    from diffc.loader import pipeline as pipeline_loader

    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    named = {"@0": str(frames[0]), "@1": str(frames[1])}
    argv = ["run", "--prompt", "a fox", "--output", str(tmp_path / "x.mp4"), "--no-progress",
            *[named.get(f, f) for f in flags]]
    assert main(argv) == 2
    assert f"diffc run: error: {fragment}" in capsys.readouterr().err


def test_a_model_without_last_frames_names_the_flag(frames, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--prompt", "a fox", "--image", str(frames[0]), "--last-image", str(frames[1]),
                 "--output", str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert "--last-image: FluxPipeline takes no last frame" in capsys.readouterr().err


def test_help_tells_the_last_frame_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--last-image FILE the video's last frame, with --image as its first" in out
    assert "Wan2.1 FLF2V needs it" in out


def test_compile_of_a_first_last_frame_checkpoint_serves_its_requests(checkpoints, frames, tmp_path, capsys):
    """The compile's example request had one image, which FLF2V refuses: `diffc compile` failed naming 'image'."""
    from tests.helpers import psnr_uint8

    ckpt, artifact = checkpoints("flf2v"), tmp_path / "flf2v.diffc"
    shape = ["--height", "16", "--width", "16", "--num-frames", "5", "--max-sequence-length", "16"]
    assert main(["compile", "--model", str(ckpt), "--out", str(artifact), *shape]) == 0, capsys.readouterr().err
    assert "WanImageToVideoPipeline" in capsys.readouterr().out
    request = dict(image=[Image.open(frames[0]), Image.open(frames[1])], height=16, width=16, num_frames=5,
                   num_inference_steps=2, max_sequence_length=16, seed=3, progress=False)
    out = diffc.load(ckpt, device="cpu", compiled=artifact).generate("a fox", **request)
    runtime = out.timings.runtime["compiled"]
    assert (runtime["compiled_calls"], runtime["eager_fallbacks"]) == (2, 0)
    assert not any("no graph" in w for w in out.warnings)
    eager = diffc.load(ckpt, device="cpu").generate("a fox", **request).frames
    assert eager.std() > 1.0 and psnr_uint8(out.frames, eager) >= 40.0


def test_the_flf2v_demo_takes_a_first_and_a_last_frame(frames, tmp_path, capsys):
    """``--task flf2v``: the built-in tiny Wan2.1 FLF2V (random weights) runs with both frames and, like the
    checkpoints it stands for, refuses one frame in one line."""
    out = tmp_path / "demo.mp4"
    assert main(["run", "--task", "flf2v", "--prompt", "a fox", "--image", str(frames[0]), "--last-image",
                 str(frames[1]), "--output", str(out), *SIZE]) == 0
    assert len(_read(out)) == 5
    capsys.readouterr()
    assert main(["run", "--task", "flf2v", "--prompt", "a fox", "--image", str(frames[0]), "--output",
                 str(tmp_path / "one.mp4"), *SIZE]) == 2
    err = capsys.readouterr().err
    assert "--last-image: this first-last-frame checkpoint (pos_embed_seq_len) needs a first and a last frame" in err
    assert not (tmp_path / "one.mp4").exists()
