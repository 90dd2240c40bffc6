"""``diffc run``: generate an image or a video from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import InvalidArgumentError
from ..fileio import atomic_write
from .compile import MAX_BATCH
from .config import merge_config
from .lora_flags import add_lora_flags, lora_settings
from .options import (add_cache_flags, add_compiled_flag, add_model_flags, add_progress_flag, add_runtime_flags,
                      cache_flag_errors, cache_settings, progress_shown, resolve_model, runtime_options)
from .outputs import check_json_output, check_media_output, check_not_input, check_outside
from .parallel import add_parallel_flags


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate an image or a video", description=__doc__)
    add_model_flags(p, "run")
    p.add_argument("--prompt", help="text prompt")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="input image for editing and image-to-video models (repeat for models taking several); "
                        "image-to-video: the first frame")
    p.add_argument("--last-image", metavar="FILE",
                   help="the video's last frame, with --image as its first (diffusers' last_image; the same as a "
                        "second --image): Wan2.1 FLF2V needs it, Wan2.2 I2V-A14B takes it")
    p.add_argument("--negative-prompt", help="negative prompt, for models with classifier-free guidance (Wan, "
                   "Z-Image, Qwen-Image and -Edit; FLUX.1 and Kontext with --true-cfg-scale)")
    p.add_argument("--height", type=int, help="output height in pixels")
    p.add_argument("--width", type=int, help="output width in pixels")
    p.add_argument("--num-frames", type=int, help="video frames (video models; 4k+1)")
    p.add_argument("--fps", type=int, help="frames per second of the written video (default 16)")
    p.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    p.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    p.add_argument("--guidance-2", type=float, dest="guidance_scale_2",
                   help="guidance scale of the low-noise expert (two-expert models: Wan2.2 A14B; default: --guidance)")
    p.add_argument("--true-cfg-scale", type=float, dest="true_cfg_scale",
                   help="true classifier-free guidance scale with --negative-prompt (> 1 turns it on; FLUX.1-dev, "
                        "Kontext; Qwen-Image, default 4.0)")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed in the summary)")
    p.add_argument("--max-sequence-length", type=int, help="text tokens kept for the main text encoder")
    p.add_argument("--output", "-o", help="output file (.png/.jpg/.webp for images, .mp4 for videos)")
    p.add_argument("--batch", type=int,
                   help=f"images or videos to make of the prompt in one call, 1 to {MAX_BATCH} (default 1); several "
                        "are written as OUTPUT-0.png, OUTPUT-1.png, ... (one generator for all with --seed, else a seed "
                        "each)")
    p.add_argument("--scheduler", choices=("unipc", "euler"), help="sampler instead of the checkpoint's own (Wan: unipc or euler)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add_runtime_flags(p)
    add_cache_flags(p)
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--config", help="YAML or JSON file of options; command-line flags override it")
    p.add_argument("--perf-dump-path", help="write per-stage seconds, per-step ms and peak memory as JSON")
    add_progress_flag(p, "denoising, decoding, loading weights, building the demo model")
    add_compiled_flag(p)
    add_lora_flags(p)
    add_parallel_flags(p)
    p.add_argument("--compile", action="store_const", const=True,
                   help="compile the DiT for this shape first (cached under $DIFFC_CACHE/compiled: later runs reuse it)")
    p.add_argument("--quality", choices=("lossless", "fast", "fp8"), help="--compile's quality tier (default fast)")
    p.set_defaults(func=run, _parser=p)


# request fields every model checks the same way (pipelines.base.validate_common), checked before loading
COMMON_FIELDS = ("negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "guidance_scale_2",
                 "seed")


def numbered(output: Path, count: int) -> list[Path]:
    """Where ``count`` outputs go: ``output`` itself for one, else ``stem-0.suffix`` ... beside it."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def read_image(path: str, flag: str = "--image"):
    """Open an input image fully (so a bad file fails here, naming it ``flag``), as PIL reads it, in one of
    ``IMAGE_FORMATS`` (formats Pillow decodes itself: no Ghostscript for an EPS file)."""
    from PIL import Image, UnidentifiedImageError

    import warnings

    from ..pipelines.images import IMAGE_FORMATS, declared_too_large, too_large, upright

    if not str(path).strip():  # Path("") is the current directory
        raise InvalidArgumentError(flag, "is empty; give an image file")
    if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():  # a FIFO, a device: would block
        raise InvalidArgumentError(flag, f"{path} is not a regular file; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, in one line
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if too_large(w, h):
                    raise InvalidArgumentError(flag, f"{path} is {w}x{h} pixels, {too_large(w, h)}")
                im.load()
                return upright(im.copy())
    except InvalidArgumentError:
        raise
    except FileNotFoundError:
        raise InvalidArgumentError(flag, f"file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidArgumentError(flag, f"{path} is a directory; give an image file") from None
    except UnidentifiedImageError:
        names = ", ".join(f.replace("WEBP", "WebP") for f in IMAGE_FORMATS)
        raise InvalidArgumentError(flag, f"{path}: not an image diffc reads ({names})") from None
    except Image.DecompressionBombError as exc:  # a header declaring billions of pixels, refused by Pillow's open
        raise InvalidArgumentError(flag, f"{path} is {declared_too_large(exc)}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: a broken PNG
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InvalidArgumentError(flag, f"{path}: not a readable image ({reason})") from None


def check_last_image_flags(args: argparse.Namespace) -> None:
    """``--last-image`` comes with one ``--image``, the first frame (checked before the model loads)."""
    if args.last_image is None:
        return
    if not str(args.last_image).strip():
        raise InvalidArgumentError("--last-image", "is empty; give an image file")
    if not args.image:
        raise InvalidArgumentError("--last-image", "needs the first frame too: --image FIRST --last-image LAST")
    if len(args.image) > 1:
        raise InvalidArgumentError("--last-image", f"goes with one --image (the first frame), got {len(args.image)} "
                                                   "--image files: give --image FIRST --last-image LAST")


def check_last_frame(pipe, args: argparse.Namespace, count: int) -> None:
    """A last frame where the checkpoint reads one, and none missing where it needs one, in the flags' words
    (a second ``--image`` is refused by the pipeline, naming ``--image``)."""
    from ..pipelines.base import last_frame_input

    mode, why = last_frame_input(pipe)
    if args.last_image is not None and mode == "none":
        raise InvalidArgumentError("--last-image", why)
    if mode == "required" and count == 1:
        raise InvalidArgumentError("--last-image", f"{why}: give --image FIRST --last-image LAST")


def run(args: argparse.Namespace) -> int:
    from ..loader.pipeline import load as load_pipeline

    from . import parallel as par

    merge_config(args, args._parser)
    progress = progress_shown(args)
    if not args.prompt or not args.prompt.strip():
        raise InvalidArgumentError("--prompt", "a non-empty prompt is required")
    from ..pipelines.base import GenerationRequest, check_unicode, validate_common
    from ..pipelines.video import MAX_FPS

    check_unicode("--prompt", [args.prompt])  # before any model loads
    if args.negative_prompt is not None:
        check_unicode("--negative-prompt", [args.negative_prompt])
    if args.fps is not None and not 1 <= args.fps <= MAX_FPS:
        raise InvalidArgumentError("--fps", f"must be from 1 to {MAX_FPS}, got {args.fps}")
    count = 1 if args.batch is None else args.batch
    if not 1 <= count <= MAX_BATCH:
        raise InvalidArgumentError("--batch", f"must be from 1 to {MAX_BATCH}, got {count}")
    prompt = args.prompt if count == 1 else [args.prompt] * count
    # the checks every model makes (sizes, steps, guidance, seed), now rather than after minutes of loading
    validate_common(GenerationRequest(prompt=prompt, **{k: getattr(args, k) for k in COMMON_FIELDS}))
    for flag, value in (("--output", args.output), ("--perf-dump-path", args.perf_dump_path)):
        if value is not None and not str(value).strip():
            raise InvalidArgumentError(flag, "is empty; give a file name")
    check_last_image_flags(args)
    layout = par.parallel_config(args)
    if layout is not None and not par.in_worker():
        choice = resolve_model(args)
        kind = par.check_devices(layout, choice.device)
        if choice.output is not None:  # a bad path is one line here, not an error in every worker
            check_media_output(args.output or ("output.png" if choice.output == "image" else "output.mp4"),
                               choice.output)
        choice.checkpoint()  # the demo is built once, before the workers read it
        return par.launch_command(par.with_seed(args._argv, args.seed), layout, kind)
    main_rank = par.is_main()
    options = {k: getattr(args, k) for k in ("negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                                             "guidance_scale", "guidance_scale_2", "seed", "max_sequence_length",
                                             "true_cfg_scale")}
    if args.compile and args.compiled:
        raise InvalidArgumentError("--compile", "give either --compile (compile now, cached) or --compiled ARTIFACT, not both")
    if args.quality is not None and not args.compile:
        raise InvalidArgumentError("--quality", "applies to --compile only (an artifact's tier was chosen by `diffc compile`)")
    cache = cache_settings(args)
    lora = lora_settings(args)
    choice = resolve_model(args)
    if choice.output == "image" and args.fps is not None:
        raise InvalidArgumentError("--fps", "applies to video models only")
    if choice.output is None:  # a generic (diffusers) pipeline diffusers is not installed for: checked after loading
        output = Path(args.output or "output.png")
    else:
        output = check_media_output(args.output or ("output.png" if choice.output == "image" else "output.mp4"),
                                    choice.output)
    dump_path = check_json_output(args.perf_dump_path, "--perf-dump-path") if args.perf_dump_path else None
    reads = {"checkpoint": choice.path, "artifact": args.compiled}
    files = {"--image": args.image, "--last-image": [args.last_image], "--config": [args.config]}
    for flag, path in [("--output", p) for p in numbered(output, count)] + [("--perf-dump-path", dump_path)]:
        if flag == "--output" and count > 1 and choice.output is not None:  # OUTPUT-i: a folder, a name too long
            check_media_output(path, choice.output)
        if path is not None:
            check_outside(path, flag, reads)
            check_not_input(path, flag, files)
    images = [read_image(path) for path in args.image or ()]
    if args.last_image is not None:
        images.append(read_image(args.last_image, "--last-image"))
    if choice.notice and main_rank:
        print(choice.notice, file=sys.stderr)
    for key, value in choice.defaults.items():
        if key in options and options[key] is None:
            options[key] = value  # the compiled shape, then the demo's size and steps, where the command gives none
    model_path = choice.checkpoint()
    started = time.perf_counter()
    mesh = None
    if layout is not None:
        from ..parallel import init_mesh

        mesh = init_mesh(layout, par.rank_device(par.check_devices(layout, choice.device)))
        if options.get("seed") is None:  # torchrun without --seed: every rank takes rank 0's random seed
            options["seed"] = par.shared_seed()
    pipe = load_pipeline(model_path, device=mesh.device if mesh else choice.device, dtype=args.dtype,
                         scheduler=args.scheduler, compiled=args.compiled, **runtime_options(args))
    if mesh is not None:
        pipe.executor.set_parallel(mesh)
    load_s = time.perf_counter() - started
    if choice.output is None:
        if args.output is None and pipe.spec.output == "video":
            output = Path("output.mp4")
        output = check_media_output(output, pipe.spec.output)
        if pipe.spec.output == "image" and args.fps is not None:
            raise InvalidArgumentError("--fps", "applies to video models only")
    check_last_frame(pipe, args, len(images))
    if lora is not None:
        for adapter in pipe.set_lora(**lora)["loaded_adapters"]:
            for w in adapter["warnings"]:
                print(f"warning: LoRA '{adapter['nickname']}': {w}", file=sys.stderr)
    options = {k: v for k, v in options.items() if v is not None}
    if images:
        options["image"] = images[0] if len(images) == 1 else images
    request = pipe.resolve(prompt=prompt, **options)
    with cache_flag_errors():
        pipe.check_cache(cache)
    compile_s = None
    if args.compile:
        from ..runtime.artifacts import compile_cached

        started = time.perf_counter()
        bucket = {k: v for k, v in options.items() if k in ("height", "width", "num_frames", "guidance_scale",
                                                             "max_sequence_length", "true_cfg_scale")}
        if images:  # an editing model's DiT shapes follow its input images' sizes
            sizes = [f"{im.width}x{im.height}" for im in images]
            bucket["image_size"] = sizes[0] if len(sizes) == 1 else sizes
        if "true_cfg_scale" in bucket and options.get("negative_prompt") is not None:
            bucket["negative_prompt"] = options["negative_prompt"]  # true CFG doubles the DiT batch
        if count > 1 or getattr(pipe.spec, "prompt_shapes", False):  # the batch; a DiT holding the prompts at
            bucket["prompt"] = request.prompts  # their own length also reads their text
            if options.get("negative_prompt") is not None:
                bucket["negative_prompt"] = options["negative_prompt"]
        log = (lambda line: print(line, file=sys.stderr)) if main_rank else (lambda line: None)
        if mesh is not None:  # each rank compiles its own shard's shapes, in process (nothing cached)
            pipe.compile([bucket], quality=args.quality or "fast", log=log)
        else:
            compile_cached(pipe, bucket, tier=args.quality or "fast", log=log)
        compile_s = time.perf_counter() - started

    if mesh is not None:
        from ..parallel.collectives import guarded

        with guarded(f"rank {mesh.rank}"):
            out = pipe.generate(prompt=prompt, progress=main_rank and progress, cache=cache,
                                **options)
        if not main_rank:
            return 0  # rank 0 alone writes the output and reports
    else:
        out = pipe.generate(prompt=prompt, progress=progress, cache=cache, **options)
    outputs = numbered(output, count)
    for i, path in enumerate(outputs):
        out.save(path, index=i, fps=args.fps or 16)  # each written to a temporary name and renamed
    if dump_path is not None:
        dump = {"model": str(model_path), "compiled": args.compiled, "load_s": load_s, "compile_s": compile_s,
                "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
                "request": {k: v for k, v in vars(request).items() if k != "image"}, "seed": out.seeds[0],
                "output": str(output), "outputs": [str(p) for p in outputs], "seeds": out.seeds,
                "warnings": out.warnings,
                "lora": pipe.list_loras()["active"] if lora is not None else None,
                "warmup": getattr(pipe, "warmup_report", None), **out.timings.to_dict()}
        atomic_write(dump_path, lambda tmp: tmp.write_text(json.dumps(dump, indent=2, default=str)))
    for w in out.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if pipe.spec.output == "video":  # what was written (a generic pipeline may round the frame count)
        frames, height, width = out.videos[0].shape[:3]
        size = f"{width}x{height}x{frames}f"
    else:
        size = f"{out.images[0].width}x{out.images[0].height}"
    report = out.timings.runtime.get("cache")
    if report:
        f = report["forwards"]
        size += f", {report['kind']} skipped {f['skipped']} of {f['computed'] + f['skipped']} DiT forwards"
    seeds = f"seed {out.seeds[0]}" if len(out.seeds) == 1 else f"seeds {', '.join(map(str, out.seeds))}"
    wrote = ", ".join(str(p) for p in outputs)
    print(f"diffc: wrote {wrote} ({size}, {request.num_inference_steps} steps, {seeds}) - {out.timings.summary()}")
    return 0
