"""``diffc compile``: trace the DiT, run the fusion passes, measure attention backends, write an artifact."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from typing import Iterator

from ..errors import InvalidArgumentError
from ..fileio import atomic_write
from .config import merge_config
from .options import (add_model_flags, add_progress_flag, add_runtime_flags, progress_shown, resolve_model,
                      runtime_options)
from .outputs import check_artifact_output, check_json_output, check_not_input, check_outside

BUCKET = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="compile a model's DiT ahead of time into an artifact for run/serve --compiled",
                       description=__doc__)
    add_model_flags(p, "compile")
    p.add_argument("--out", "-o", required=True,
                   help="artifact directory to write (a previous diffc artifact there is replaced once the new one is "
                        "complete; anything else is refused)")
    p.add_argument("--height", type=int, help="output height in pixels of the shape to compile")
    p.add_argument("--width", type=int, help="output width in pixels of the shape to compile")
    p.add_argument("--num-frames", type=int, help="video frames of the shape to compile (video models)")
    p.add_argument("--bucket", action="append", default=[], metavar="WxH[xF]",
                   help="another shape to compile, width x height [x frames]; repeatable")
    p.add_argument("--guidance", type=float, dest="guidance_scale",
                   help="guidance scale the runs will use (Wan: > 1 compiles the batched CFG pair)")
    p.add_argument("--batch", type=int, default=1, help="images or videos per prompt the runs will make (default 1)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="an example of the prompts the runs will use; repeatable (default: a short built-in one). "
                        "Z-Image and Qwen-Image hold the prompt in the DiT's sequence at its own length (a multiple "
                        "of 32 and 128 tokens): each example compiles its length (see --prompt-lengths); other "
                        "models compile one shape for any prompt")
    p.add_argument("--prompt-lengths", choices=("all", "examples"),
                   help="Z-Image, Qwen-Image: all (the default without --prompt) compiles every text length a "
                        "prompt can have up to --max-sequence-length, so the artifact serves any prompt; examples "
                        "(the default with --prompt) compiles the lengths of the --prompt examples only")
    p.add_argument("--max-sequence-length", type=int, help="text tokens the runs will use")
    p.add_argument("--image-size", action="append", metavar="WxH",
                   help="editing models: the input image size the runs will use (repeat for several input images)")
    p.add_argument("--quality", choices=("lossless", "fast", "fp8"), default="fast",
                   help="lossless: only bit-exact rewrites; fast (default): every fusion; fp8: fast plus float8_e4m3 "
                        "GEMMs (inputs quantized by the kernel that produces them, or on their own where that "
                        "pays) and fp8 self-attention with flashinfer on Hopper (bf16 models; quality report in "
                        "the log)")
    p.add_argument("--disable", default="", help="comma-separated passes to leave out (for measuring each one; "
                                                 "fp8_attention, fp8_quantize_rows, fp8_quantize_concat, "
                                                 "fp8_gemv and fp8_fast_accum leave out fp8 steps; key_mask_attention leaves "
                                                 "attention under a prompt-padding mask to the masked SDPA)")
    p.add_argument("--enable", default="",
                   help="comma-separated opt-in passes to run too (concat_linear, cat_linear_rows)")
    p.add_argument("--attention", default="auto",
                   help="attention backend: auto (measure and pick the fastest) or a backend name (measured "
                        "against sdpa, used where it is correct and faster; the log says why not)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--scheduler", choices=("unipc", "euler"), help="sampler the runs will use")
    p.add_argument("--config", help="YAML or JSON file of options; command-line flags override it")
    p.add_argument("--report", help="also write the compile report as JSON here")
    add_progress_flag(p, "loading weights, building the demo model")
    add_runtime_flags(p)
    p.set_defaults(func=compile_command, _parser=p)


MAX_BATCH = 64  # samples per compiled call: beyond any batch a DiT is run at


def parse_buckets(args: argparse.Namespace, video: bool) -> list[dict]:
    """The requests to compile: --height/--width[/--num-frames] first, then each --bucket; each with every
    --prompt."""
    from ..compile.examples import EXAMPLE_PROMPT
    from ..pipelines.base import GenerationRequest, validate_common

    common = {"guidance_scale": args.guidance_scale, "max_sequence_length": args.max_sequence_length}
    if not 1 <= args.batch <= MAX_BATCH:
        raise InvalidArgumentError("--batch", f"must be from 1 to {MAX_BATCH}, got {args.batch}")
    prompts = list(args.prompt) or [EXAMPLE_PROMPT]
    for text in prompts:
        if not isinstance(text, str) or not text.strip():
            raise InvalidArgumentError("--prompt", f"expected a non-empty example prompt, got {text!r}")
    if args.image_size:
        common["image_size"] = args.image_size[0] if len(args.image_size) == 1 else list(args.image_size)
    out = []
    for source, b in shapes(args, video):
        if b["num_frames"] is not None and not video:
            raise InvalidArgumentError("--num-frames", "applies to video models only")
        with bucket_errors(source):  # what every model refuses (a size of 0), before the model loads
            validate_common(GenerationRequest(prompt=EXAMPLE_PROMPT, height=b["height"], width=b["width"],
                                              guidance_scale=common["guidance_scale"]))
        for text in prompts:  # each shape with each example prompt (the compiler keeps distinct DiT shapes)
            out.append({k: v for k, v in {**common, **b, "prompt": [text] * args.batch}.items() if v is not None})
    return out


def shapes(args: argparse.Namespace, video: bool) -> list[tuple[str | None, dict]]:
    """The shapes to compile, each with the --bucket text that gave it (None: --height/--width/--num-frames)."""
    found: list[tuple[str | None, dict]] = []
    if args.height is not None or args.width is not None or args.num_frames is not None or not args.bucket:
        found.append((None, {"height": args.height, "width": args.width, "num_frames": args.num_frames}))
    for text in args.bucket:
        m = BUCKET.match(text.strip())
        if not m:
            raise InvalidArgumentError("--bucket", f"expected WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES, got {text!r}")
        width, height, frames = (int(g) if g else None for g in m.groups())
        if frames is not None and not video:
            raise InvalidArgumentError("--bucket", f"{text!r} gives frames, but this is an image model")
        found.append((text.strip(), {"height": height, "width": width, "num_frames": frames}))
    return found


@contextlib.contextmanager
def bucket_errors(source: str | None) -> Iterator[None]:
    """A size the checks refuse, named by the ``--bucket`` that gave it (they name --height, --width and
    --num-frames, which the command may not have given)."""
    try:
        yield
    except InvalidArgumentError as exc:
        if source is None or exc.field not in ("height", "width", "num_frames"):
            raise
        raise InvalidArgumentError("--bucket", f"{source!r} ({exc.field.replace('_', '-')}): {exc.message}") from None


def with_prompt_lengths(args: argparse.Namespace, pipe, buckets: list[dict]) -> list[dict]:
    """``buckets`` asking for every prompt length (``--prompt-lengths all``, the default without ``--prompt`` on a
    model that counts its prompts' tokens), or as they are."""
    from ..compile.prompt_lengths import counts_prompts

    mode = args.prompt_lengths
    if mode == "all" and args.prompt:
        raise InvalidArgumentError("--prompt-lengths", "all compiles every prompt length; give either it or "
                                   "--prompt examples (with --prompt-lengths examples)")
    if mode == "all" or (mode is None and not args.prompt and counts_prompts(pipe)):
        return [{**b, "prompt_lengths": "all"} for b in buckets]  # no --prompt: one bucket per shape already
    return buckets


def check_passes(quality: str, disable: tuple[str, ...], enable: tuple[str, ...], attention: str) -> None:
    """Refuse an unknown ``--disable``/``--enable`` pass, one the ``--quality`` tier does not run, or an unknown
    ``--attention`` backend, by the flag."""
    from ..compile.compiler import check_attention, fusion_passes

    try:
        fusion_passes(quality, disable, enable)
        check_attention(attention)
    except InvalidArgumentError as exc:  # its field is the Python argument each of these flags sets
        raise InvalidArgumentError(f"--{exc.field}", exc.message) from None


def compile_command(args: argparse.Namespace) -> int:
    from ..loader.pipeline import load as load_pipeline
    from ..compile.examples import example_request, expand_prompt_lengths

    merge_config(args, args._parser)
    progress_shown(args)
    disable = tuple(n.strip() for n in args.disable.split(",") if n.strip())
    enable = tuple(n.strip() for n in args.enable.split(",") if n.strip())
    check_passes(args.quality, disable, enable, args.attention)  # a misspelt name fails now, not after the load
    choice = resolve_model(args)
    out = check_artifact_output(args.out, "--out")  # before the minutes of loading and compiling
    check_outside(out, "--out", {"checkpoint": choice.path})
    if args.report is not None and not str(args.report).strip():  # it was taken as no report at all
        raise InvalidArgumentError("--report", "is empty; give a file name")
    report_path = check_json_output(args.report, "--report") if args.report else None
    if report_path is not None:
        report_real, out_real = report_path.resolve(), out.resolve()
        if report_real == out_real or report_real.is_relative_to(out_real):
            raise InvalidArgumentError("--report", f"{args.report} is the artifact --out writes, or inside it; "
                                                   "write the report elsewhere")
        check_outside(report_path, "--report", {"checkpoint": choice.path})
        check_not_input(report_path, "--report", {"--config": [args.config]})
    # a generic pipeline's kind is known once it is loaded (when diffusers is missing here)
    buckets = parse_buckets(args, video=choice.output == "video") if choice.output is not None else None
    if choice.notice:
        print(choice.notice, file=sys.stderr)
    model_path = choice.checkpoint()
    pipe = load_pipeline(model_path, device=choice.device, dtype=args.dtype, scheduler=args.scheduler,
                      **runtime_options(args))
    if buckets is None:
        buckets = parse_buckets(args, video=pipe.spec.output == "video")
    buckets = with_prompt_lengths(args, pipe, buckets)
    if choice.demo:
        defaults = {k: v for k, v in choice.defaults.items() if k != "num_inference_steps"}
        buckets = [{**defaults, **b} for b in buckets]
    sources = [source for source, _ in shapes(args, pipe.spec.output == "video") for _ in args.prompt or [None]]
    for source, b in zip(sources, buckets):  # the model's own checks (a multiple of 16), naming the --bucket
        with bucket_errors(source):
            pipe.resolve(**example_request(pipe, {k: v for k, v in b.items() if k != "prompt_lengths"}))
    buckets = expand_prompt_lengths(pipe, buckets)
    for b in buckets:
        pipe.resolve(**example_request(pipe, b))  # refuse an invalid size before any tracing
    print(f"diffc compile: {pipe.spec.pipeline_class} from {model_path} on {pipe.device} "
          f"({str(pipe.dtype).removeprefix('torch.')}), quality {args.quality}, {len(buckets)} shape(s)")
    report = pipe.compile(buckets, out=str(out), quality=args.quality, disable=disable, enable=enable,
                          attention=args.attention)
    if report_path is not None:
        atomic_write(report_path, lambda tmp: tmp.write_text(json.dumps(report.to_dict(), indent=2, default=str)))
    print(f"diffc compile: wrote {args.out} ({report.artifact_bytes / 1e6:.1f} MB, weights not included) "
          f"in {report.total_s:.1f}s")
    return 0
