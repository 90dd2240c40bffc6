"""`diffc run` end to end through the CLI entry point: demo model, config files, perf dump, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffc.cli.main import main


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_help_lists_run(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "run" in capsys.readouterr().out


def test_negative_prompt_help_names_every_family_that_takes_one(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    line = out[out.index("--negative-prompt NEGATIVE_PROMPT"):out.index("--height HEIGHT output")]
    for family in ("Wan", "Z-Image", "Qwen-Image", "FLUX.1", "Kontext"):  # each spec with uses_negative_prompt
        assert family in line


def test_demo_run_writes_image_and_perf_dump(demo_cache, tmp_path, capsys):
    out, perf = tmp_path / "fox.png", tmp_path / "perf.json"
    code = main(["run", "--prompt", "a red fox in snow", "--output", str(out), "--perf-dump-path", str(perf),
                 "--seed", "7", "--height", "64", "--width", "96", "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    assert "RANDOM weights" in captured.err and "--model" in captured.err
    # --no-progress: no bar at all, neither transformers' (writing the demo, loading its text encoders) nor diffc's
    assert not any(bar in captured.err for bar in ("it/s", "%|", "\r")), captured.err
    assert f"wrote {out} (96x64, 2 steps, seed 7)" in captured.out
    assert (demo_cache / "demo" / "flux-tiny-v1" / "model_index.json").is_file()
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 96, 3) and image.std() > 1.0
    dump = json.loads(perf.read_text())
    assert dump["seed"] == 7 and dump["request"]["num_inference_steps"] == 2
    assert set(dump["stages"]) == {"encode_prompt", "prepare_latents", "prepare_timesteps", "denoise", "decode", "postprocess"}
    assert len(dump["step_ms"]) == 2 and all(ms > 0 for ms in dump["step_ms"])
    assert dump["total_s"] > 0 and "peak_memory_mb" in dump and dump["host_peak_rss_mb"] > 0

    # same seed again: the cached demo is reused and the image is identical
    out2 = tmp_path / "fox2.png"
    assert main(["run", "--prompt", "a red fox in snow", "--output", str(out2), "--seed", "7", "--height", "64",
                 "--width", "96", "--steps", "2", "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out2)), image)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_with_flag_override(flux_checkpoint, tmp_path, suffix, capsys):
    options = {"model": str(flux_checkpoint("dev-tiny")), "prompt": "a calico cat", "height": 32, "width": 48,
               "steps": 1, "num-inference-steps": 1, "seed": 3, "no_progress": True}
    options.pop("steps")  # config keys are the option names (dest), with dashes or underscores
    cfg = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        cfg.write_text(json.dumps(options))
    else:
        import yaml
        cfg.write_text(yaml.safe_dump(options))
    out = tmp_path / "cat.png"
    assert main(["run", "--config", str(cfg), "--width", "64", "--output", str(out)]) == 0
    assert Image.open(out).size == (64, 32)  # width from the flag, height from the file
    assert "1 steps, seed 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--height", "40"], "--height: FLUX needs a multiple of 16, got 40 (try 32 or 48)"),
    (["--steps", "0"], "--steps: must be an integer from 1 to 1000"),
    (["--guidance", "-2"], "--guidance: must be a number from 0 to 100"),
    (["--output", "x.mp4"], "--output: an image model writes .png, .jpg, .jpeg, .webp files"),
    (["--output", "/nonexistent/dir/x.png"], "--output: directory does not exist"),
    (["--negative-prompt", "blurry"], "--negative-prompt: FluxPipeline uses a negative prompt only with true_cfg_scale > 1 "
                                      "(true classifier-free guidance); true_cfg_scale is not set"),
    (["--negative-prompt", "blurry", "--true-cfg-scale", "1"], "; true_cfg_scale is 1.0"),
    (["--fps", "8"], "--fps: applies to video models only"),
    (["--device", "tpu"], "--device: 'tpu' is not a device; use 'cpu', 'cuda' or 'cuda:N'"),
    (["--dtype", "int4"], "--dtype: 'int4' is not supported"),
    (["--model", "/nonexistent"], "--model: checkpoint directory not found: /nonexistent"),
    # checked by the Python API after loading, reported under the flag that set the argument
    (["--image", "IMAGE"], "--image: FluxPipeline does not take an input image"),
    (["--num-frames", "5"], "--num-frames: FLUX.1 is an image model"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to"),
])
def test_bad_input_is_one_clear_line(demo_cache, tmp_path, capsys, argv, fragment):
    base = ["run", "--prompt", "a fox", "--output", str(tmp_path / "a.png"), "--no-progress"]
    if "--output" in argv:
        base = base[:3] + ["--no-progress"]
    if "IMAGE" in argv:
        Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
        argv = [str(tmp_path / "in.png") if a == "IMAGE" else a for a in argv]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "a.png").exists()


def test_missing_prompt_and_bad_config(tmp_path, capsys):
    assert main(["run"]) == 2
    assert "--prompt: a non-empty prompt is required" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"prompt": "x", "sampler": "ddim"}))
    assert main(["run", "--config", str(bad)]) == 2
    assert "unknown option 'sampler'" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "none.yaml"), "--prompt", "x"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_cuda_graphs_flag_on_cpu(flux_checkpoint, tmp_path, capsys):
    out, perf = tmp_path / "a.png", tmp_path / "perf.json"
    base = ["run", "--model", str(flux_checkpoint("dev-tiny")), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--steps", "1", "--no-progress", "--output", str(out)]
    assert main(base + ["--cuda-graphs", "on"]) == 2
    assert "--cuda-graphs: CUDA graphs need a CUDA GPU; this pipeline runs on cpu" in capsys.readouterr().err
    assert main(base + ["--cuda-graphs", "off", "--perf-dump-path", str(perf)]) == 0
    runtime = json.loads(perf.read_text())["runtime"]
    assert runtime["cuda_graphs"] == {"enabled": False, "reason": "turned off"} and runtime["compiled"] is None


def test_offload_flags_on_cpu(flux_checkpoint, tmp_path, capsys):
    base = ["run", "--model", str(flux_checkpoint("dev-tiny")), "--prompt", "a fox", "--height", "32", "--width", "32",
            "--steps", "1", "--no-progress", "--output", str(tmp_path / "a.png")]
    assert main(base + ["--offload", "layerwise"]) == 2
    assert "--offload: 'layerwise' offload needs a CUDA GPU; this pipeline runs on cpu" in capsys.readouterr().err
    assert main(base + ["--offload-prefetch", "0"]) == 2
    assert "--offload-prefetch: must be an integer from 1 to 16" in capsys.readouterr().err
    assert main(base + ["--offload", "none"]) == 0


def test_input_images_open_in_pillow_own_decoders_only(tmp_path, monkeypatch):
    """``--image``: PNG, JPEG, WebP, BMP, TIFF and GIF decode; an EPS file never reaches Ghostscript; a directory or
    a file of another kind is one line naming the flag."""
    from PIL import EpsImagePlugin

    from diffc.cli.run import read_image
    from diffc.errors import InvalidArgumentError

    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        Image.new("RGB", (6, 5), (200, 10, 10)).save(tmp_path / f"in.{fmt.lower()}", format=fmt)
        assert read_image(str(tmp_path / f"in.{fmt.lower()}")).size == (6, 5)
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a) or Image.new("RGB", (1, 1)))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    eps = tmp_path / "in.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(InvalidArgumentError, match=r"--image: .*in\.eps: not an image diffc reads \(PNG, JPEG, WebP"):
        read_image(str(eps))
    assert ran == []
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        read_image(str(tmp_path))


@pytest.mark.parametrize("side", [16000, 100000])
def test_an_input_image_header_declaring_billions_of_pixels_is_too_large(tmp_path, side):
    """Found by an audit: past Pillow's bomb limit a header's size was 'not a readable image (... decompression bomb
    DOS attack.)', not the 'too large' line a smaller oversized image gets."""
    import io
    import struct
    import zlib

    from diffc.cli.run import read_image
    from diffc.errors import InvalidArgumentError

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(data))
    with pytest.raises(InvalidArgumentError, match=rf"huge\.png is {side * side} pixels by its header, too large \(at "
                                                   r"most 16384 a side and 67108864 pixels\)"):
        read_image(str(tmp_path / "huge.png"))


def test_input_image_files_found_by_an_audit(tmp_path):
    """A PNG whose chunks are broken (PIL raises SyntaxError), a FIFO (it blocked for ever), a declared size past
    the limit (checked before decoding, without PIL's warning) are one line; a JPEG's EXIF orientation is applied,
    as diffusers' ``load_image`` does (a portrait phone photo was edited sideways)."""
    import io
    import os
    import warnings

    from diffc.cli.run import read_image
    from diffc.errors import InvalidArgumentError

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT")
    data[at - 4:at] = (int.from_bytes(data[at - 4:at], "big") // 2).to_bytes(4, "big")  # the image data cut short
    (tmp_path / "broken.png").write_bytes(bytes(data))
    with pytest.raises(InvalidArgumentError, match=r"--image: .*broken\.png: not a readable image"):
        read_image(str(tmp_path / "broken.png"))
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(InvalidArgumentError, match="is not a regular file"):
        read_image(str(tmp_path / "fifo.png"))
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidArgumentError, match=r"bomb\.png is 12000x12000 pixels, too large"):
            read_image(str(tmp_path / "bomb.png"))
    photo = Image.new("RGB", (64, 48), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(str(tmp_path / "phone.jpg")).size == (48, 64)


@pytest.mark.parametrize("mode,values,want", [
    ("I;16", [0, 32896, 65535], [0, 128, 255]),
    ("I", [0, 32896, 65535], [0, 128, 255]),
    ("I", [0, 100, 255], [0, 100, 255]),
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
    ("L", [0, 100, 255], [0, 100, 255]),
])
def test_wide_greyscale_inputs_are_scaled_not_clipped(mode, values, want):
    """``convert("RGB")`` clips 16-bit values at 255 (98% of a 16-bit ramp turned white) and float ones in [0, 1]
    to black; ``to_rgb`` scales them to 8 bits."""
    import numpy as np

    from diffc.pipelines.images import to_rgb

    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "L": np.uint8}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    got = np.asarray(to_rgb(image))
    assert got.shape == (1, 3, 3) and got[0, :, 0].tolist() == want and (got[..., 0] == got[..., 2]).all()


@pytest.mark.parametrize("argv,fragment", [
    (["--output", ""], "--output: is empty; give a file name"),
    (["--output", " "], "--output: is empty; give a file name"),
    (["--perf-dump-path", ""], "--perf-dump-path: is empty; give a file name"),
    (["--image", ""], "--image: is empty; give an image file"),  # was 'file not found: ' (found by an audit)
    (["--image", " "], "--image: is empty; give an image file"),
])
def test_an_empty_path_is_refused_not_defaulted(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output.png").write_bytes(b"MINE")
    assert main(["run", "--prompt", "a fox", "--no-progress", *argv]) == 2
    assert fragment in capsys.readouterr().err
    assert (tmp_path / "output.png").read_bytes() == b"MINE"


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", "a fox", "--output", "/nonexistent-dir/a.png"], "--output: directory does not exist"),
    (["--output", "a.png"], "--prompt: a non-empty prompt is required"),
])
def test_multi_process_runs_check_their_flags_before_starting_workers(tmp_path, capsys, monkeypatch, argv, fragment):
    from diffc.cli import parallel

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(parallel, "launch_command", lambda *a, **k: pytest.fail("workers started"))
    assert main(["run", "--num-gpus", "2", "--device", "cpu", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_batch_writes_numbered_outputs_as_one_call_makes_them(flux_checkpoint, tmp_path, capsys):
    """``--batch N``: N samples of the prompt in one call, written as OUTPUT-i; with --seed, what the Python API's
    ``num_images_per_prompt`` gives for that seed; without, a seed each, each made again alone by it."""
    import diffc

    ckpt = flux_checkpoint("dev-tiny")
    size = ["--height", "32", "--width", "48", "--steps", "2", "--max-sequence-length", "16"]
    out, perf = tmp_path / "fox.png", tmp_path / "perf.json"
    assert main(["run", "--model", str(ckpt), "--prompt", "a red fox", "--batch", "3", "--seed", "4", "--output",
                 str(out), "--perf-dump-path", str(perf), "--no-progress", *size]) == 0
    names = [tmp_path / f"fox-{i}.png" for i in range(3)]
    assert f"wrote {', '.join(map(str, names))} (48x32, 2 steps, seed 4)" in capsys.readouterr().out
    assert not out.exists()
    want = diffc.load(ckpt).generate("a red fox", seed=4, num_images_per_prompt=3, height=32, width=48,
                                     num_inference_steps=2, max_sequence_length=16, progress=False).images
    for name, image in zip(names, want):
        assert np.array_equal(np.asarray(Image.open(name)), np.asarray(image))
    dump = json.loads(perf.read_text())
    assert dump["outputs"] == [str(n) for n in names] and dump["seeds"] == [4]
    assert main(["run", "--model", str(ckpt), "--prompt", "a red fox", "--batch", "2", "--output",
                 str(tmp_path / "cat.png"), "--no-progress", *size]) == 0
    seeds = capsys.readouterr().out.split("seeds ")[1].split(")")[0].split(", ")
    assert len(seeds) == 2
    again = tmp_path / "again.png"
    assert main(["run", "--model", str(ckpt), "--prompt", "a red fox", "--seed", seeds[1], "--output", str(again),
                 "--no-progress", *size]) == 0
    # a batch of two and a single call sum in other orders: at most one level of 255 apart on a few pixels (README)
    diff = np.abs(np.asarray(Image.open(again)).astype(int) - np.asarray(Image.open(tmp_path / "cat-1.png")).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("batch", ["0", "65", "-1"])
def test_a_batch_out_of_range_is_one_line(tmp_path, capsys, batch):
    assert main(["run", "--prompt", "a fox", "--batch", batch, "--output", str(tmp_path / "x.png")]) == 2
    assert f"--batch: must be from 1 to 64, got {batch}" in capsys.readouterr().err


def test_a_numbered_output_may_not_overwrite_an_input(tmp_path, capsys):
    image = tmp_path / "in-1.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["run", "--prompt", "a fox", "--batch", "2", "--image", str(image), "--output",
                 str(tmp_path / "in.png")]) == 2
    assert "--output: " + str(image) + " is the --image file" in capsys.readouterr().err and image.is_file()


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", " \n"], "--prompt: a non-empty prompt is required"),
    (["--steps", "0"], "--steps: must be an integer from 1 to 1000, got 0"),
    (["--height", "99999"], "--height: must be an integer from 1 to 16384, got 99999"),
    (["--width", "-16"], "--width: must be an integer from 1 to 16384, got -16"),
    (["--guidance", "nan"], "--guidance: must be a number from 0 to 100, got nan"),
    (["--guidance-2", "inf"], "--guidance-2: must be a number from 0 to 100, got inf"),
    (["--seed", "-5"], "--seed: must be an integer from 0 to"),
])
def test_what_every_model_refuses_is_refused_before_loading(tmp_path, capsys, monkeypatch, argv, fragment):
    """Found by an audit: --steps 0, a NaN guidance or a negative seed were found only once the model had loaded
    (minutes for a real checkpoint), and a whitespace prompt got the Python API's wording."""
    from diffc.loader import pipeline as pipeline_loader

    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    base = ["run", "--prompt", "a fox", "--output", str(tmp_path / "a.png"), "--no-progress"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert f"diffc run: error: {fragment}" in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def wan_demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("wan-demo-cache")


def test_a_request_too_large_for_memory_is_one_line(wan_demo_cache, tmp_path, capsys, monkeypatch):
    """Found by an audit: a video too large for the machine (here 274 GB of latents) was a RuntimeError traceback
    from torch's allocator. The address space is capped for the test, so the allocation fails on any machine
    (however it overcommits) instead of being attempted."""
    import resource

    monkeypatch.setenv("DIFFC_CACHE", str(wan_demo_cache))
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + (8 << 30)
    out = tmp_path / "big.mp4"
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        code = main(["run", "--task", "t2v", "--prompt", "a fox", "--height", "16384", "--width", "16384",
                     "--num-frames", "4093", "--steps", "1", "--max-sequence-length", "8", "--no-progress",
                     "--output", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert ("diffc run: error: out of memory: host memory could not hold another 256.00 GiB; ask for a smaller size, "
            "fewer frames or a smaller --batch (on a GPU, --offload helps)\n") in err
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_wording_for_cuda_and_other_errors():
    """A CUDA out-of-memory names the GPU and torch's size; any other RuntimeError is not one (it is re-raised)."""
    import torch

    from diffc.cli.main import out_of_memory

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                  "79.19 GiB of which 3.12 GiB is free.")
    assert out_of_memory(cuda).startswith("out of memory: the GPU could not hold another 20.00 GiB; ")
    assert out_of_memory(MemoryError()).startswith("out of memory: host memory could not hold what this request ")
    assert out_of_memory(RuntimeError("shape mismatch")) is None


def test_an_output_name_near_the_filesystem_limit(flux_checkpoint, tmp_path, capsys, monkeypatch):
    """Found by an audit: a legal 254-byte --output failed after generating (the temporary name beside it was longer
    than 255 bytes); with --batch, OUTPUT-0 past the limit, or OUTPUT-1 an existing folder, was found only when
    saving."""
    from diffc.loader import pipeline as pipeline_loader

    name = tmp_path / ("b" * 250 + ".png")
    assert main(["run", "--model", str(flux_checkpoint("dev-tiny")), "--prompt", "a fox", "--height", "32", "--width",
                 "32", "--steps", "1", "--no-progress", "--output", str(name)]) == 0, capsys.readouterr().err
    assert Image.open(name).size == (32, 32) and sorted(p.name for p in tmp_path.iterdir()) == [name.name]
    monkeypatch.setattr(pipeline_loader, "load", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "fox-1.png").mkdir()
    for output, fragment in ((name, f"--output: {str(tmp_path / ('b' * 250))[:200]}...: File name too long"),
                             (tmp_path / "fox.png", f"--output: {tmp_path / 'fox-1.png'} is a directory")):
        assert main(["run", "--prompt", "a fox", "--batch", "2", "--no-progress", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
