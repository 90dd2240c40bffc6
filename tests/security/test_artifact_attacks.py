"""Attacks on a compiled artifact: a pickle or code-bearing text anywhere in it must never run, and is refused.

One tiny FLUX artifact is compiled per module; each test tampers with a copy. Most attacks also
rewrite the manifest's hashes ("re-signed"), as the author of a malicious artifact would, so the
format itself, not only the hash check, has to refuse them. Every test asserts that the payload's
marker file was never created.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

import diffc
from diffc.compile import artifact as art
from diffc.compile import kernel_cache
from diffc.compile.artifact import ArtifactError

REQUEST = {"height": 64, "width": 64, "max_sequence_length": 8}
GRAPH = "transformer/transformer_blocks/bucket-0.json"  # the first region graph
PT2 = "transformer/transformer_blocks/bucket-0.pt2"
KEY = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # a Triton cache key folder (base32)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the payload ran"


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def test_the_payload_is_live(tmp_path):
    """The payload these tests plant does run when unpickled (so their assertions can fail)."""
    flag = tmp_path / "ran"
    pickle.loads(payload(flag))
    assert flag.exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from diffc.demo.flux import build_flux_demo

    checkpoint = tmp_path_factory.mktemp("demo-flux")
    build_flux_demo(checkpoint)
    out = tmp_path_factory.mktemp("artifact") / "flux.diffc"
    diffc.load(checkpoint, device="cpu").compile([REQUEST], out=str(out), log=lambda line: None)
    return checkpoint, out


@pytest.fixture
def copy(built, tmp_path):
    target = tmp_path / "copy.diffc"
    shutil.copytree(built[1], target)
    return target


def manifest(path: Path) -> dict:
    return json.loads((path / art.MANIFEST).read_text())


def write_manifest(path: Path, data: dict) -> None:
    (path / art.MANIFEST).write_text(json.dumps(data))


def resign(path: Path) -> None:
    """List every file now in the artifact with its true hash, and hash the manifest's fields again, as a malicious
    author would."""
    data = manifest(path)
    data["files"] = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).as_posix()
        if relative != art.MANIFEST and (file.is_file() or file.is_symlink()):
            content = file.read_bytes()
            data["files"][relative] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    fields = json.dumps({k: v for k, v in data.items() if k != "manifest_sha256"}, sort_keys=True,
                        separators=(",", ":"))
    data["manifest_sha256"] = hashlib.sha256(fields.encode()).hexdigest()
    write_manifest(path, data)


def load(built, path: Path):
    return diffc.load(built[0], device="cpu", compiled=path)


def refused(built, path: Path, fragment: str) -> str:
    with pytest.raises(ArtifactError) as info:
        load(built, path)
    assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_the_artifact_loads_and_runs(built, copy):
    pipe = load(built, copy)
    out = pipe.generate("a kite", num_inference_steps=1, seed=1, progress=False, **REQUEST)
    assert out.timings.runtime["compiled"]["compiled_calls"] == 1


# ---- the old format: torch.export's .pt2 zip of pickles -----------------------------------------

def _poisoned_pt2(path: Path, marker: Path) -> None:
    """A real torch.export.save archive whose every pickled member is replaced by the payload."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w + torch.tensor([1.0, 2.0])

    clean = path.with_suffix(".clean")
    torch.export.save(torch.export.export(Tiny(), (torch.ones(2),)), str(clean))
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        names = src.namelist()
        assert any(n.endswith("sample_inputs/model.pt") for n in names)
        for name in names:
            is_pickle = name.endswith(".pt") or "/data/weights/" in name or "/data/constants/" in name
            dst.writestr(name, payload(marker) if is_pickle else src.read(name))
    clean.unlink()


def test_an_old_pt2_artifact_is_refused_unread(built, copy, marker):
    data = manifest(copy)
    data["format_version"] = 1
    data.pop("files")
    data["stages"]["transformer"]["buckets"][0]["regions"][0]["file"] = PT2
    write_manifest(copy, data)
    (copy / GRAPH).unlink()
    _poisoned_pt2(copy / PT2, marker)
    refused(built, copy, f"artifact format 1, this diffc reads format {art.FORMAT_VERSION}; recompile it")


def test_a_pt2_named_in_a_current_manifest_is_refused(built, copy, marker):
    _poisoned_pt2(copy / PT2, marker)
    data = manifest(copy)
    data["stages"]["transformer"]["buckets"][0]["regions"][0]["file"] = PT2
    write_manifest(copy, data)
    resign(copy)
    refused(built, copy, f"{PT2}: a compiled graph is a .json file")


@pytest.mark.parametrize("content", ["pickle", "pt2"])
def test_the_graph_file_replaced_by_a_pickle_is_refused(built, copy, marker, content):
    if content == "pickle":
        (copy / GRAPH).write_bytes(payload(marker))
    else:
        _poisoned_pt2(copy / GRAPH, marker)
    resign(copy)
    refused(built, copy, f"cannot read compiled graph {copy}/{GRAPH}: not valid JSON")


def test_a_constants_file_the_graph_does_not_list_is_refused(built, copy, marker):
    (copy / GRAPH).with_suffix(".safetensors").write_bytes(payload(marker))
    resign(copy)
    refused(built, copy, "a constants file is present but the program lists no constants")


@pytest.fixture
def tiny_artifact(tmp_path):
    """An artifact of a tiny program with a lifted constant (the kind Wan's RoPE tables are)."""

    class WithConstant(torch.nn.Module):
        def forward(self, x):
            return x * torch.tensor([0.5, 1.5, -2.25])

    program = torch.export.export(WithConstant(), (torch.ones(3),))
    assert program.constants
    writer = art.ArtifactWriter(tmp_path / "tiny.diffc")
    writer.save_program(program, "stage/p.json")
    path = writer.commit({"format_version": art.FORMAT_VERSION, "stages": {}})
    return path, program


def test_constants_round_trip_exactly(tiny_artifact):
    path, program = tiny_artifact
    loaded = art.open_artifact(path).load_program("stage/p.json")
    assert set(loaded.constants) == set(program.constants)
    for name, value in program.constants.items():
        assert torch.equal(loaded.constants[name], value) and loaded.constants[name].dtype == value.dtype
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(loaded.module()(x), program.module()(x))


@pytest.mark.parametrize("content", ["pickle", "torch.save"])
def test_a_poisoned_constants_file_is_refused(tiny_artifact, marker, content):
    path = tiny_artifact[0]
    constants = path / "stage" / "p.safetensors"
    if content == "pickle":
        constants.write_bytes(payload(marker))
    else:
        torch.save({"lifted_tensor_0": Payload(marker)}, constants)
    resign(path)
    with pytest.raises(ArtifactError, match="constants are not a valid safetensors file"):
        art.open_artifact(path).load_program("stage/p.json")


# ---- code hidden in the graph's JSON ----------------------------------------------------------

def _edit_graph(path: Path, edit) -> None:
    document = json.loads((path / GRAPH).read_text())
    edit(document["exported_program"])
    (path / GRAPH).write_text(json.dumps(document))
    resign(path)


def _sympy_payload(marker: Path):
    def edit(graph):
        values = graph["graph_module"]["graph"]["tensor_values"]
        first = next(iter(values.values()))
        first["sizes"][0] = {"as_expr": {"expr_str": f"__import__('os').system('touch {marker}')", "hint": None}}
    return edit


def _call(target: str):
    def edit(graph):
        graph["graph_module"]["graph"]["nodes"][0]["target"] = target
    return edit


def _range_constraints(graph):
    graph["range_constraints"] = {"s0": {"min_val": 2, "max_val": 8}}


def _custom_object(graph):
    graph["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"name": "obj", "class_fqn": "os.system"}}


@pytest.mark.parametrize("edit,fragment", [
    (_sympy_payload, "a symbolic shape expression ('as_expr')"),
    (lambda m: _call("torch.serialization.load"), "the graph calls 'torch.serialization.load'"),
    (lambda m: _call("builtins.eval"), "the graph calls 'builtins.eval'"),
    (lambda m: _call("#torch:load"), "the graph calls '#torch:load'"),
    (lambda m: _call("torch.ops.aten.no_such_op.default"), "calls torch.ops.aten.no_such_op.default, which is not an operator"),
    (lambda m: _range_constraints, "the graph has symbolic shapes"),
    (lambda m: _custom_object, "a custom (pickled) object"),
], ids=["sympify", "torch-load", "eval", "extension-op", "unknown-aten-op", "dynamic-shapes", "custom-object"])
def test_code_in_the_graph_json_is_refused(built, copy, marker, edit, fragment):
    _edit_graph(copy, edit(marker))
    refused(built, copy, fragment)


def _tensor_value(size: int, offset: int = 0, scalar: bool = False) -> dict:
    return {"dtype": 1, "sizes": [] if scalar else [{"as_int": size}], "strides": [] if scalar else [{"as_int": 1}],
            "requires_grad": False, "device": {"type": "cpu", "index": None}, "storage_offset": {"as_int": offset},
            "layout": 7}


def _node(name: str, target: str, inputs: list) -> dict:
    return {"name": name, "target": target, "inputs": inputs, "outputs": [{"as_tensor": {"name": name}}],
            "metadata": {}, "is_hop_single_tensor_return": None}


def _file_writer(target: Path, payload: bytes):
    """Nodes that map ``target`` shared (created if missing) and fill it byte by byte: a file written by loading."""
    def edit(graph):
        g = graph["graph_module"]["graph"]
        arg = lambda name, value, kind=1: {"name": name, "arg": value, "kind": kind}  # noqa: E731
        nodes = [_node("mapped", "torch.ops.aten.from_file.default", [
            arg("filename", {"as_string": str(target)}), arg("shared", {"as_bool": True}),
            arg("size", {"as_int": len(payload)}), arg("dtype", {"as_scalar_type": 1}, 2)])]
        g["tensor_values"]["mapped"] = _tensor_value(len(payload))
        for i, byte in enumerate(payload):
            g["tensor_values"][f"byte_{i}"] = g["tensor_values"][f"filled_{i}"] = _tensor_value(1, i, scalar=True)
            nodes += [_node(f"byte_{i}", "torch.ops.aten.select.int", [
                          arg("self", {"as_tensor": {"name": "mapped"}}), arg("dim", {"as_int": 0}),
                          arg("index", {"as_int": i})]),
                      _node(f"filled_{i}", "torch.ops.aten.fill_.Scalar", [
                          arg("self", {"as_tensor": {"name": f"byte_{i}"}}), arg("value", {"as_int": byte})])]
        g["nodes"] = nodes + g["nodes"]
    return edit


def test_a_graph_that_writes_a_file_is_refused(built, copy, tmp_path):
    """Found by an audit: ``aten.from_file(shared=True)`` + ``fill_`` wrote any file the user can write (a ``.pth``
    in site-packages: code at the next Python start) from a re-signed artifact. Refused when the graph is read."""
    target = tmp_path / "planted.pth"
    _edit_graph(copy, _file_writer(target, b"import os\n"))
    refused(built, copy, "calls torch.ops.aten.from_file.default, which a stored graph may not call")
    assert not target.exists()


@pytest.mark.parametrize("target", ["aten.from_file.default", "aten.save.default", "aten.set_.source_Storage",
                                    "aten.set.source_Storage", "aten._unsafe_index_put.default",
                                    "aten._unsafe_index.Tensor", "aten._index_put_impl_.default",
                                    "aten._sparse_coo_tensor_unsafe.default", "aten._print.default"])
def test_operators_that_reach_outside_the_graph_are_refused(built, copy, target):
    _edit_graph(copy, _call(f"torch.ops.{target}"))
    refused(built, copy, f"calls torch.ops.{target}, which a stored graph may not call")


def test_the_rebuilt_graph_is_checked_too():
    """The same rule on an fx graph, the second check after torch's reader."""
    from diffc.compile import program_io

    graph = torch.fx.Graph()
    graph.output(graph.call_function(torch.ops.aten.from_file.default, ("x.bin",)))
    with pytest.raises(program_io.ProgramFormatError, match="may not call"):
        program_io.check_graph(torch.fx.GraphModule(torch.nn.Module(), graph))


# ---- tampering: the manifest's hashes -------------------------------------------------------

def test_a_modified_file_is_refused(built, copy):
    data = bytearray((copy / GRAPH).read_bytes())
    data[len(data) // 2] ^= 1
    (copy / GRAPH).write_bytes(bytes(data))
    refused(built, copy, f"{copy}/{GRAPH} was modified after `diffc compile` wrote it")


def test_an_unknown_file_is_refused(built, copy, marker):
    (copy / "transformer" / "extra.pkl").write_bytes(payload(marker))
    refused(built, copy, f"{copy}/transformer/extra.pkl is not listed in the artifact's manifest")


def test_a_file_dropped_from_the_manifest_is_refused(built, copy):
    data = manifest(copy)
    data["files"].pop(GRAPH)
    write_manifest(copy, data)
    refused(built, copy, f"{copy}/{GRAPH} is not listed in the artifact's manifest")


def test_a_manifest_without_file_hashes_is_refused(built, copy):
    data = manifest(copy)
    data.pop("files")
    write_manifest(copy, data)
    refused(built, copy, "the manifest lists no files")


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd", "transformer/./x.json", ".hidden"])
def test_a_manifest_naming_paths_outside_is_refused(built, copy, name):
    data = manifest(copy)
    data["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(copy, data)
    refused(built, copy, "the manifest lists an invalid file name")


def test_a_symlink_is_refused(built, copy, tmp_path):
    (tmp_path / "elsewhere.json").write_text("{}")
    (copy / "transformer" / "link.json").symlink_to(tmp_path / "elsewhere.json")
    resign(copy)
    refused(built, copy, "transformer/link.json is a symbolic link")


def test_a_pickled_manifest_is_refused(built, copy, marker):
    (copy / art.MANIFEST).write_bytes(payload(marker))
    refused(built, copy, "manifest.json is not valid JSON")


# ---- the kernel cache -------------------------------------------------------------------------

def _kernels(root: Path) -> Path:
    """A well-formed compiled kernel in the artifact's cache (metadata, binary, IR and its group)."""
    folder = root / kernel_cache.TRITON_CACHE / KEY
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kern.json").write_text(json.dumps({"name": "kern", "hash": "0"}))
    (folder / "kern.cubin").write_bytes(b"\x7fELF" + b"\0" * 60)
    (folder / "kern.ptx").write_text("// ptx\n")
    group = {"child_paths": {n: n for n in ("kern.json", "kern.cubin", "kern.ptx")}}
    (folder / "__grp__kern.json").write_text(json.dumps(group))
    return folder


def test_kernels_go_to_a_private_cache_only(built, copy, tmp_path, monkeypatch):
    user_cache, home = tmp_path / "user-triton-cache", tmp_path / "home"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(user_cache))
    monkeypatch.setenv("HOME", str(home))
    _kernels(copy)
    resign(copy)
    load(built, copy)
    private = Path(os.environ["TRITON_CACHE_DIR"])
    assert private != user_cache and not user_cache.exists() and not (home / ".triton").exists()
    assert private.name.startswith(f"diffc-triton-{os.getpid()}-") and oct(private.stat().st_mode & 0o777) == "0o700"
    assert sorted(p.name for p in (private / KEY).iterdir()) == ["__grp__kern.json", "kern.cubin", "kern.json", "kern.ptx"]
    group = json.loads((private / KEY / "__grp__kern.json").read_text())["child_paths"]
    assert group == {n: str(private / KEY / n) for n in ("kern.json", "kern.cubin", "kern.ptx")}


def test_compile_keeps_only_kernel_files(tmp_path):
    """The writer drops launchers, links, stray files and folders, and makes group files path-free."""
    writer = art.ArtifactWriter(tmp_path / "k.diffc")
    cache = writer.file(kernel_cache.TRITON_CACHE)
    folder = _kernels(cache.parent)
    (folder / "__triton_launcher.so").write_bytes(b"\x7fELF")
    (folder / "kern.cubin.tmp").write_bytes(b"x")
    (folder / "link.json").symlink_to(folder / "kern.json")
    (folder / "deeper").mkdir()
    (folder / "deeper" / "x.json").write_text("{}")
    group = {"child_paths": {n: f"/somewhere/{KEY}/{n}" for n in ("kern.json", "kern.cubin", "kern.ptx")}}
    (folder / "__grp__kern.json").write_text(json.dumps(group))
    path = writer.commit({"format_version": art.FORMAT_VERSION, "stages": {}})
    kept = sorted(r for r in manifest(path)["files"])
    assert kept == [f"triton-cache/{KEY}/{n}" for n in ("__grp__kern.json", "kern.cubin", "kern.json", "kern.ptx")]
    stored = json.loads((path / "triton-cache" / KEY / "__grp__kern.json").read_text())
    assert stored == {"child_paths": {n: n for n in ("kern.json", "kern.cubin", "kern.ptx")}}
    assert art.open_artifact(path).install_kernel_cache() is not None


def _so(folder: Path, marker: Path) -> None:
    (folder / "__triton_launcher.so").write_bytes(b"\x7fELF" + payload(marker))


def _pickle_as(name: str):
    def plant(folder: Path, marker: Path) -> None:
        (folder / name).write_bytes(payload(marker))
    return plant


def _group_outside(folder: Path, marker: Path) -> None:
    (folder / "__grp__kern.json").write_text(json.dumps({"child_paths": {"kern.json": "/etc/passwd"}}))


def _group_missing(folder: Path, marker: Path) -> None:
    (folder / "__grp__kern.json").write_text(json.dumps({"child_paths": {"other.cubin": f"{folder}/other.cubin"}}))


def _too_deep(folder: Path, marker: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "sub" / "kern.json").write_text("{}")


@pytest.mark.parametrize("plant,fragment", [
    (_so, "'.so' files are not part of a kernel cache"),
    (_pickle_as("payload.pkl"), "'.pkl' files are not part of a kernel cache"),
    (_pickle_as("kern.json"), f"triton-cache/{KEY}/kern.json: not a JSON object"),
    (_pickle_as("kern.cubin"), f"triton-cache/{KEY}/kern.cubin: not an ELF object"),
    (_pickle_as("kern.ptx"), f"triton-cache/{KEY}/kern.ptx: not UTF-8 text"),
    (_group_outside, "names a file outside its folder or not in the artifact: '/etc/passwd'"),
    (_group_missing, "names a file outside its folder or not in the artifact"),
    (_too_deep, "a kernel cache holds only triton-cache/<key>/<file>"),
], ids=["launcher-so", "pkl", "pickle-as-json", "pickle-as-cubin", "pickle-as-ptx", "group-outside",
        "group-missing", "too-deep"])
def test_a_poisoned_kernel_cache_is_refused(built, copy, marker, tmp_path, monkeypatch, plant, fragment):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "user-cache"))
    plant(_kernels(copy), marker)
    resign(copy)
    refused(built, copy, fragment)
    assert not (tmp_path / "user-cache").exists()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "user-cache")


def test_an_unlisted_kernel_file_is_refused(built, copy, marker):
    _so(_kernels(copy), marker)
    refused(built, copy, "is not listed in the artifact's manifest")


@pytest.mark.parametrize("region", [["transformer_blocks"], {"a": 1}, 7, None])
def test_a_region_name_that_is_not_a_string_is_refused(built, copy, region):
    data = manifest(copy)
    data["stages"]["transformer"]["buckets"][0]["regions"][0]["region"] = region
    write_manifest(copy, data)
    resign(copy)
    refused(built, copy, "is not a block list of")


# ---- the manifest's own fields ----------------------------------------------------------------
# Found by an audit: the manifest hashed every file but not itself, so an edit of a field that changes what loading
# does (passes.tier "fp8" quantized the weights of graphs that read none; a region's key ran its graph on inputs of
# other shapes) loaded without a word. Its fields are hashed now, and a re-signed manifest must still fit its graphs.

def _set(data: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


REGION_KEY = ("stages", "transformer", "buckets", 0, "regions", 0, "key")


@pytest.mark.parametrize("path,value", [(("passes", "tier"), "fp8"), (("passes", "tier"), "lossless"),
                                        (REGION_KEY, "arg0=1x64x32:float32"), (("created",), "yesterday")])
def test_an_edited_manifest_field_is_refused(built, copy, path, value):
    data = manifest(copy)
    _set(data, path, value)
    write_manifest(copy, data)
    refused(built, copy, f"{copy}/manifest.json was modified after `diffc compile` wrote it (its fields no longer "
                         "match its manifest_sha256); recompile")


def test_a_manifest_without_its_digest_is_refused(built, copy):
    data = manifest(copy)
    data.pop("manifest_sha256")
    write_manifest(copy, data)
    refused(built, copy, "manifest.json has no manifest_sha256; recompile the artifact")


@pytest.mark.parametrize("tier,fragment", [
    ("fp8", "passes.tier is 'fp8', but no graph reads fp8 weights; recompile"),  # quantized weights none read
    ("turbo", "passes.tier is 'turbo', not one of lossless, fast, fp8"),
    (5, "passes.tier is '5', not one of"),
])
def test_a_resigned_tier_must_fit_the_graphs(built, copy, tier, fragment):
    data = manifest(copy)
    data["passes"]["tier"] = tier
    write_manifest(copy, data)
    resign(copy)
    refused(built, copy, fragment)


def test_a_resigned_region_key_must_be_its_graphs(built, copy):
    data = manifest(copy)
    key = data["stages"]["transformer"]["buckets"][0]["regions"][0]["key"]
    _set(data, REGION_KEY, key.replace("arg0=1x16x", "arg0=1x64x"))
    write_manifest(copy, data)
    resign(copy)
    refused(built, copy, f"the key of {GRAPH} is 'arg0=1x64x")


# ---- arguments and signatures torch reads from the graph (found by an audit) ------------------------------------

def _operator_argument(graph):
    """An argument torch resolves as any attribute of torch by its name: here os.system, whose repr then went into
    the code fx generates for the graph (a SyntaxError traceback)."""
    node = next(n for n in graph["graph_module"]["graph"]["nodes"]
                if any("as_tensor" in i["arg"] for i in n["inputs"]))
    next(i for i in node["inputs"] if "as_tensor" in i["arg"])["arg"] = {"as_operator": "torch.os.system"}


def _input_mutation(graph):
    """A graph that writes into its input instead of returning a value: refused naming the graph's file."""
    signature = graph["graph_module"]["signature"]
    out = signature["output_specs"][0]["user_output"]["arg"]["as_tensor"]
    signature["output_specs"][0] = {"user_input_mutation": {"arg": out, "user_input_name": "hidden_states"}}


@pytest.mark.parametrize("edit,fragment", [
    (_operator_argument, "the graph holds an operator passed as an argument ('as_operator'), which diffc does not read"),
    (_input_mutation, f"{GRAPH}: a compiled block graph may only return values (it also has ['USER_INPUT_MUTATION'])"),
])
def test_a_graph_torch_reads_but_diffc_does_not_run_is_the_artifacts_error(built, copy, edit, fragment):
    _edit_graph(copy, edit)
    refused(built, copy, fragment)


def test_the_checkpoint_configs_the_artifact_is_matched_to_are_read_bounded(built, copy, tmp_path):
    """Found by an audit: ``config_hash`` read the checkpoint's config.json whole before anything else did, so one
    linked to /dev/zero took all memory (a MemoryError); it is read as every config is, at most 16 MiB."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(built[0], checkpoint)
    config = checkpoint / "transformer" / "config.json"
    config.unlink()
    with open(config, "wb") as f:
        f.truncate(20 << 20)  # sparse: no disk used
    with pytest.raises(ArtifactError, match=f"cannot identify the model: {config}: larger than 16 MiB; not a config"):
        diffc.load(checkpoint, device="cpu", compiled=copy)


def test_folders_nested_deeper_than_an_artifacts_are_refused(built, copy):
    """Found by an audit: the walk over the artifact recursed once per folder level, so 1000 nested folders were a
    RecursionError traceback; a folder deeper than diffc writes is refused by name (here 9 levels)."""
    deep = copy / "transformer" / "/".join("a" * 8)
    deep.mkdir(parents=True)
    refused(built, copy, f"{copy}/transformer/{'/'.join('a' * 8)}: folders nested deeper than an artifact's (8 levels)")
