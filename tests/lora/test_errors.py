"""Every mistake a user can make with set_lora is a clear error naming the field; nothing is unpickled."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import diffc
from diffc.errors import CheckpointError, InvalidArgumentError
from tests.lora import writers as W


@pytest.mark.parametrize("kwargs,field,message", [
    (dict(nickname=""), "lora_nickname", "non-empty string"),
    (dict(nickname=3), "lora_nickname", "non-empty string"),
    (dict(nickname=["a", "a"], path=["x", "y"]), "lora_nickname", "twice"),
    (dict(nickname="new"), "lora_path", "no adapter named 'new' is loaded"),
    (dict(nickname=["a", "b"], path="x.safetensors"), "lora_path", "list of 2 paths"),
    (dict(nickname=["a", "b"], path=["x"]), "lora_path", "one path per nickname"),
    (dict(nickname="a", path=5), "lora_path", "file or folder path"),
    (dict(nickname="a", path="P", strength=float("nan")), "strength", "finite"),
    (dict(nickname="a", path="P", strength=True), "strength", "a number"),
    (dict(nickname="a", path="P", strength="1"), "strength", "a number"),
    (dict(nickname=["a", "b"], path=["P", "P"], strength=[1.0, 2.0, 3.0]), "strength", "one per adapter"),
    (dict(nickname="a", path="P", target="unet"), "target", "all, transformer, transformer_2"),
    (dict(nickname="a", path="P", target="transformer_2"), "target", "no 'transformer_2'"),
])
def test_bad_arguments(flux, kwargs, field, message):
    if kwargs.get("path") == "P" or kwargs.get("path") == ["P", "P"]:
        kwargs["path"] = flux.files["second"] if kwargs["path"] == "P" else [flux.files["second"]] * 2
    with pytest.raises(InvalidArgumentError, match=message) as info:
        flux.pipe.set_lora(**kwargs)
    assert info.value.field == field
    assert all(torch.equal(v, flux.base[k]) for k, v in flux.pipe.components["transformer"].state_dict().items())


def test_bad_files(flux, tmp_path):
    with pytest.raises(InvalidArgumentError, match="lora_path: file not found"):
        flux.pipe.set_lora("a", tmp_path / "missing.safetensors")
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InvalidArgumentError, match=r"pickled checkpoints \(\.bin\) are never loaded"):
        flux.pipe.set_lora("a", pickled)
    with pytest.raises(InvalidArgumentError, match="holds no .safetensors file.*lora.bin"):
        flux.pipe.set_lora("a", tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a valid safetensors file"):
        flux.pipe.set_lora("a", garbage)
    W.write_keys({"x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "other.safetensors")
    with pytest.raises(InvalidArgumentError, match="several .safetensors files"):
        flux.pipe.set_lora("a", tmp_path)
    half = W.write_keys({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, tmp_path / "d" / "half.safetensors")
    with pytest.raises(CheckpointError, match="proj_out has only one of its two LoRA matrices"):
        flux.pipe.set_lora("a", half)
    assert flux.pipe.list_loras()["loaded_adapters"] == []


def test_offload_is_refused_until_the_runtime_hosts_lora(flux_lora):
    import dataclasses

    pipe = diffc.load(flux_lora.ckpt, device="cpu")
    pipe.runtime_options = dataclasses.replace(pipe.runtime_options, offload="layerwise")
    with pytest.raises(InvalidArgumentError, match="cannot be merged with --offload layerwise"):
        pipe.set_lora("a", flux_lora.files["second"])


NAN, INF = float("nan"), float("inf")
META = r"'transformer\.{}' in its 'lora_adapter_metadata' metadata "
NUMBER = "must be a finite number, got "
PATTERNS = "must be an object of module patterns to finite numbers"
RANK0 = r"transformer\.proj_out\.lora_{}\.weight has shape \(0, {}\): rank 0; a LoRA's rank must be at least 1"


@pytest.mark.parametrize("rank,alpha,metadata,message", [
    (4, None, {"transformer.lora_alpha": "abc"}, META.format("lora_alpha") + NUMBER + "'abc'"),
    (4, None, {"transformer.lora_alpha": "8"}, META.format("lora_alpha") + NUMBER + "'8'"),
    (4, None, {"transformer.lora_alpha": [1, 2]}, META.format("lora_alpha") + NUMBER + r"\[1, 2\]"),
    (4, None, {"transformer.lora_alpha": True}, META.format("lora_alpha") + NUMBER + "True"),
    (4, None, {"transformer.lora_alpha": NAN}, META.format("lora_alpha") + NUMBER + "nan"),
    (4, None, {"transformer.lora_alpha": -INF}, META.format("lora_alpha") + NUMBER + "-inf"),
    (4, None, {"lora_alpha": {}}, r"'lora_alpha' in its 'lora_adapter_metadata' metadata " + NUMBER + r"\{\}"),
    (4, None, {"transformer.alpha_pattern": [1], "transformer.lora_alpha": 4},
     META.format("alpha_pattern") + PATTERNS + r", got \[1\]"),
    (4, None, {"transformer.alpha_pattern": "proj_out", "transformer.lora_alpha": 4},
     META.format("alpha_pattern") + PATTERNS + ", got 'proj_out'"),
    (4, None, {"transformer.alpha_pattern": {"proj_out": "x"}, "transformer.lora_alpha": 4},
     META.format("alpha_pattern") + "maps 'proj_out' to 'x'; it " + PATTERNS),
    (4, None, {"transformer.alpha_pattern": {"to_q": INF}}, META.format("alpha_pattern") + "maps 'to_q' to inf"),
    (4, None, {"transformer.use_rslora": "false", "transformer.lora_alpha": 4},
     META.format("use_rslora") + "must be true or false, got 'false'"),
    (4, torch.tensor(NAN), None, r"transformer\.proj_out\.alpha is nan; alpha must be a finite number"),
    (4, torch.tensor(-INF), None, r"transformer\.proj_out\.alpha is -inf; alpha must be a finite number"),
    (4, torch.ones(3), None, r"transformer\.proj_out\.alpha must hold one finite number, got shape \(3,\)"),
    (0, torch.tensor(4.0), None, RANK0.format("A", "{in}")),
    (0, None, None, RANK0.format("A", "{in}")),
    (0, None, {"transformer.lora_alpha": 4, "transformer.use_rslora": True}, RANK0.format("A", "{in}")),
], ids=["alpha-str", "alpha-numeric-str", "alpha-list", "alpha-bool", "alpha-nan", "alpha-inf", "alpha-unprefixed",
        "pattern-list", "pattern-str", "pattern-value-str", "pattern-value-inf", "rslora-str", "alpha-tensor-nan",
        "alpha-tensor-inf", "alpha-tensor-vector", "rank0-alpha", "rank0", "rank0-rslora"])
def test_bad_alpha_or_rank_is_one_line_naming_file_and_key(flux, tmp_path, rank, alpha, metadata, message):
    """Refused before any weight changes; the message names the file, the key or tensor, and what is accepted."""
    weight = flux.pipe.components["transformer"].proj_out.weight  # (out, in)
    tensors = {"transformer.proj_out.lora_A.weight": torch.randn(rank, weight.shape[1]),
               "transformer.proj_out.lora_B.weight": torch.randn(weight.shape[0], rank)}
    if alpha is not None:
        tensors["transformer.proj_out.alpha"] = alpha
    path = W.write_keys(tensors, tmp_path / "bad.safetensors", metadata)
    with pytest.raises(CheckpointError) as info:
        flux.pipe.set_lora("bad", path)
    text = str(info.value)
    assert "\n" not in text and "another model" not in text
    assert text.startswith(f"{path}: ")
    assert re.search(message.replace("{in}", str(weight.shape[1])), text), text
    assert flux.pipe.list_loras()["loaded_adapters"] == []
    assert all(torch.equal(v, flux.base[k]) for k, v in flux.pipe.components["transformer"].state_dict().items())


@pytest.mark.parametrize("raw,reason", [
    ("{", "Expecting property name"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),  # was a RecursionError traceback
    ('{"transformer.lora_alpha": ' + "9" * 5000 + "}", "4300 digits"),  # was Python's ValueError
])
def test_unreadable_adapter_metadata_is_one_line(flux, tmp_path, raw, reason):
    weight = flux.pipe.components["transformer"].proj_out.weight  # (out, in)
    path = tmp_path / "meta.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.randn(4, weight.shape[1]),
               "transformer.proj_out.lora_B.weight": torch.randn(weight.shape[0], 4)}, str(path),
              metadata={"lora_adapter_metadata": raw})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: its 'lora_adapter_metadata' metadata is not "
                                              rf"valid JSON \(.*{reason}"):
        flux.pipe.set_lora("meta", path)
    assert flux.pipe.list_loras()["loaded_adapters"] == []


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_lora_matrices_are_refused(flux, tmp_path, dtype):
    """Found by an audit: integer matrices were cast and merged (an all-zero or wrong update, no error)."""
    weight = flux.pipe.components["transformer"].proj_out.weight  # (out, in)
    tensors = {"transformer.proj_out.lora_A.weight": torch.ones(4, weight.shape[1], dtype=dtype),
               "transformer.proj_out.lora_B.weight": torch.randn(weight.shape[0], 4),
               "transformer.proj_out.alpha": torch.tensor(4)}  # an integer alpha stays accepted
    path = W.write_keys(tensors, tmp_path / "ints.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: transformer\.proj_out: its down tensor is "
                                              rf"stored as {str(dtype).removeprefix('torch.')}, not floating point"):
        flux.pipe.set_lora("ints", path)
    assert flux.pipe.list_loras()["loaded_adapters"] == []
    assert all(torch.equal(v, flux.base[k]) for k, v in flux.pipe.components["transformer"].state_dict().items())


@pytest.mark.parametrize("alpha", [-8.0, 0.0, 8])
def test_any_finite_alpha_is_taken_as_peft_takes_it(flux, tmp_path, alpha):
    """PEFT's LoraConfig keeps a negative or zero lora_alpha (scale alpha / r), and so does diffc."""
    import diffusers

    dit = flux.pipe.components["transformer"]
    lora = W.random_lora(dit, ["proj_out", "transformer_blocks.0.attn.to_q"], seed=9, alpha=alpha)
    flux.pipe.set_lora("signed", W.write_diffusers(lora, tmp_path / "signed", diffusers.FluxPipeline))
    weights = dict(dit.named_parameters())
    for name, want in lora.expected(flux.base, 1.0).items():
        torch.testing.assert_close(weights[name].double(), want, rtol=0, atol=2e-6, msg=name)


def _two_module_lora(dit, scale_second=1.0, fill=None):
    """lora_A / lora_B for ``x_embedder`` then ``proj_out`` (merged in that order); ``fill`` replaces proj_out's B."""
    params = dict(dit.named_parameters())
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for module in ("x_embedder", "proj_out"):
        w = params[f"{module}.weight"]
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.1
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.1 * scale_second
    if fill is not None:
        tensors["transformer.proj_out.lora_B.weight"].fill_(fill)
    return tensors


def _weights_are(flux, want: dict[str, torch.Tensor]) -> None:
    got = flux.pipe.components["transformer"].state_dict()
    changed = [k for k, v in got.items() if not torch.equal(v, want[k])]
    assert not changed, changed


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("key", ["transformer.proj_out.lora_B.weight", "transformer.proj_out.lora_A.weight"])
def test_a_lora_tensor_holding_nan_or_inf_is_refused_naming_it(flux, tmp_path, key, value):
    """Merged, it would make the weights NaN and every image black without a word; refused when the file is read."""
    tensors = _two_module_lora(flux.pipe.components["transformer"])
    tensors[key][0, 0] = value
    path = W.write_keys(tensors, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: 1 tensor(s) hold NaN or infinite values: {key}")):
        flux.pipe.set_lora("nan", path)
    assert flux.pipe.list_loras()["loaded_adapters"] == []
    _weights_are(flux, flux.base)


@pytest.mark.parametrize("case", ["alpha-beyond-float32", "weights-overflow"])
def test_a_merge_that_fails_part_way_leaves_the_weights_as_they_were(flux, tmp_path, case):
    """x_embedder merges first; proj_out then fails. Nothing stays half-merged: the adapter set before the call is
    merged again (bit-exact), and an unmerge gives the original weights."""
    import diffusers

    dit = flux.pipe.components["transformer"]
    good = W.random_lora(dit, ["x_embedder", "transformer_blocks.0.attn.to_q"], seed=7)
    flux.pipe.set_lora("good", W.write_diffusers(good, tmp_path / "good", diffusers.FluxPipeline))
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    assert any(not torch.equal(before[k], flux.base[k]) for k in before)
    if case == "alpha-beyond-float32":  # finite metadata whose alpha / rank cannot be a float32 factor
        path = W.write_keys(_two_module_lora(dit), tmp_path / "bad.safetensors",
                            {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"proj_out": 1e300}})
        message = r"transformer\.proj_out\.weight: LoRA 'bad': its alpha / rank times the strength \(2\.5e\+299\) is " \
                  r"beyond float32's range; nothing was merged"
    else:  # every value finite, the merged weight is not
        tensors = _two_module_lora(dit, fill=3e38)
        tensors["transformer.proj_out.lora_A.weight"].fill_(1.0)  # four products of 3e38 summed: beyond float32
        path = W.write_keys(tensors, tmp_path / "bad.safetensors")
        message = r"transformer\.proj_out\.weight: merging LoRA 'bad' makes this weight NaN or infinite"
    with pytest.raises(CheckpointError, match=message):
        flux.pipe.set_lora("bad", path)
    _weights_are(flux, before)
    described = flux.pipe.list_loras()
    assert [a["nickname"] for a in described["active"]["transformer"]] == ["good"]
    assert described["merged"]["transformer"] == [{"nickname": "good", "strength": 1.0}]
    flux.pipe.unmerge_lora_weights()
    _weights_are(flux, flux.base)


# ---- found by an audit: kinds, dimensions and patterns a file can hold ----------------------------------------------

def _proj_out_lora(flux, dtype=torch.float32, alpha=None) -> dict[str, torch.Tensor]:
    weight = flux.pipe.components["transformer"].proj_out.weight  # (out, in)
    tensors = {"transformer.proj_out.lora_A.weight": torch.randn(4, weight.shape[1]).to(dtype),
               "transformer.proj_out.lora_B.weight": torch.randn(weight.shape[0], 4)}
    if alpha is not None:
        tensors["transformer.proj_out.alpha"] = alpha
    return tensors


@pytest.mark.parametrize("tensors,shown", [
    # isfinite is not implemented for fp8: a NotImplementedError traceback
    (lambda f: _proj_out_lora(f, torch.float8_e4m3fn), "transformer.proj_out.lora_A.weight (F8_E4M3)"),
    (lambda f: _proj_out_lora(f, torch.float8_e8m0fnu), "transformer.proj_out.lora_A.weight (F8_E8M0)"),  # merged
    (lambda f: _proj_out_lora(f, alpha=torch.tensor(4.0).to(torch.complex64)),  # cast to real with torch's warning
     "transformer.proj_out.alpha (C64)"),
])
def test_a_lora_tensor_of_an_odd_kind_is_refused_naming_it(flux, tmp_path, tensors, shown):
    path = W.write_keys(tensors(flux), tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: 1 tensor(s) stored as a kind no LoRA holds: {shown}; "
                                                        "LoRA tensors are float32, bfloat16, float16 or float64 "
                                                        "(F32, BF16, F16, F64; an alpha may be an integer)")):
        flux.pipe.set_lora("odd", path)
    _weights_are(flux, flux.base)


def test_a_lora_tensor_of_many_dimensions_is_refused(flux, tmp_path):
    """65+ dimensions were torch's 'only tensors with up to 64 dims are supported' RuntimeError traceback."""
    tensors = _proj_out_lora(flux)
    down = tensors["transformer.proj_out.lora_A.weight"]
    tensors["transformer.proj_out.lora_A.weight"] = down.reshape(*([1] * 64), *down.shape)
    path = W.write_keys(tensors, tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: 1 tensor(s) with more than 5 dimensions: "
                                                        "transformer.proj_out.lora_A.weight (66)")):
        flux.pipe.set_lora("deep", path)
    _weights_are(flux, flux.base)


class _CountingOpen:
    """safetensors' ``safe_open``, counting the tensors read through it."""

    tensors_read = 0

    def __init__(self, *args, **kwargs):
        self._file = safe_open(*args, **kwargs)

    def __enter__(self):
        self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def get_tensor(self, name):
        type(self).tensors_read += 1
        return self._file.get_tensor(name)

    def __getattr__(self, name):
        return getattr(self._file, name)


def _header(entries: dict, length: int | None = None) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header


LORA_A = "transformer.proj_out.lora_A.weight"


@pytest.mark.parametrize("content,reason", [
    # a header claiming a tensor past the end of the file (4 GiB of it), and a header length past the file's
    (_header({LORA_A: {"dtype": "F32", "shape": [1 << 15, 1 << 15], "data_offsets": [0, 1 << 32]}}) + b"\0" * 64,
     "not a valid safetensors file (Error while deserializing header: incomplete metadata, file not fully covered)"),
    (struct.pack("<Q", 1 << 62) + b"{}", "not a valid safetensors file (Error while deserializing header: header too "
                                         "large)"),
    (_header({LORA_A: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, length=1 << 20) + b"\0" * 8,
     "not a valid safetensors file (Error while deserializing header: invalid header length)"),
    # well-formed headers whose tensors no LoRA has: found from the header, before gigabytes are read
    (_header({LORA_A: {"dtype": "F8_E4M3", "shape": [4, 64], "data_offsets": [0, 256]}}) + b"\0" * 256,
     f"1 tensor(s) stored as a kind no LoRA holds: {LORA_A} (F8_E4M3)"),
    (_header({LORA_A: {"dtype": "F32", "shape": [1, 1, 1, 1, 4, 64], "data_offsets": [0, 1024]}}) + b"\0" * 1024,
     f"1 tensor(s) with more than 5 dimensions: {LORA_A} (6)"),
], ids=["tensor-past-the-end", "huge-header-length", "header-past-the-end", "fp8", "six-dimensions"])
def test_a_bad_header_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, content, reason):
    import safetensors

    import diffc.checkpoints
    from diffc.lora.files import read_lora_file

    for module in (safetensors, diffc.checkpoints):  # wherever the reading code takes safe_open from
        monkeypatch.setattr(module, "safe_open", _CountingOpen)
    monkeypatch.setattr(_CountingOpen, "tensors_read", 0)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_lora_file(path)
    assert str(info.value).startswith(f"{path}: {reason}") and "\n" not in str(info.value), info.value
    assert _CountingOpen.tensors_read == 0


def test_a_boolean_alpha_is_refused(flux, tmp_path):
    """It was merged as alpha 1."""
    path = W.write_keys(_proj_out_lora(flux, alpha=torch.tensor(True)), tmp_path / "bool.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: transformer.proj_out.alpha is stored as a boolean")):
        flux.pipe.set_lora("bool", path)
    _weights_are(flux, flux.base)


def test_an_alpha_pattern_that_backtracks_for_ever_is_refused(flux, tmp_path):
    """An alpha_pattern key is a regular expression matched against every module name: ``(.|.)*\\d\\d`` against
    single_transformer_blocks.0.attn.to_q backtracks 2**38 times (the merge, and a server's LoRA lock, held)."""
    import time

    module = "single_transformer_blocks.0.attn.to_q"
    weight = dict(flux.pipe.components["transformer"].named_parameters())[f"{module}.weight"]
    tensors = {f"transformer.{module}.lora_A.weight": torch.randn(4, weight.shape[1]),
               f"transformer.{module}.lora_B.weight": torch.randn(weight.shape[0], 4)}
    path = W.write_keys(tensors, tmp_path / "redos.safetensors",
                        {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"(.|.)*\\d\\d": 2}})
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: its alpha_pattern key '(.|.)*\\\\d\\\\d' takes over "
                                                        f"0.5 s to match the module name '{module}'")):
        flux.pipe.set_lora("redos", path)
    assert time.perf_counter() - started < 10
    _weights_are(flux, flux.base)


def test_alpha_patterns_still_match_as_peft_matches_them(flux, tmp_path):
    """A module name's suffix and a ``^`` pattern of the whole name select their alpha (the same pieces as before)."""
    dit = flux.pipe.components["transformer"]
    tensors = _proj_out_lora(flux)
    for pattern in ("proj_out", "^proj_.ut", "(a|b)*proj_out"):
        path = W.write_keys(tensors, tmp_path / "p.safetensors",
                            {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {pattern: 8}})
        flux.pipe.set_lora("p", path)
        down, up = tensors["transformer.proj_out.lora_A.weight"], tensors["transformer.proj_out.lora_B.weight"]
        want = flux.base["proj_out.weight"].double() + 2.0 * (up.double() @ down.double())  # 8 / rank 4
        torch.testing.assert_close(dit.proj_out.weight.double(), want, rtol=0, atol=2e-6, msg=pattern)
        flux.reset()


@pytest.mark.parametrize("second", ["lora_unet_final_layer_linear", "proj_out"])  # kohya's name; PEFT's unprefixed
def test_a_module_named_twice_is_refused(flux, tmp_path, second):
    """Found by an audit: a file naming proj_out both as diffusers does and as kohya does merged it twice (double
    strength) without a word."""
    tensors = _proj_out_lora(flux)
    down, up = tensors["transformer.proj_out.lora_A.weight"], tensors["transformer.proj_out.lora_B.weight"]
    suffixes = ("lora_down", "lora_up") if second.startswith("lora_unet") else ("lora_A", "lora_B")
    tensors[f"{second}.{suffixes[0]}.weight"], tensors[f"{second}.{suffixes[1]}.weight"] = down.clone(), up.clone()
    path = W.write_keys(tensors, tmp_path / "twice.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + r".* both update proj_out\.weight \(one module "
                                              r"named twice, e\.g\. in two key formats\); a LoRA names each module once"):
        flux.pipe.set_lora("twice", path)
    _weights_are(flux, flux.base)
