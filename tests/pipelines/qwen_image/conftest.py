"""Session fixtures: each tiny Qwen-Image checkpoint is built and saved once; the diffusers oracle is cached."""

from __future__ import annotations

import pytest

from .checkpoints import build_components, build_pipeline, save_checkpoint


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    """Factory: ``qwen_checkpoint(kind) -> (Path, diffusers pipeline)`` for kind in t2i, edit, edit_plus; all three
    share the same random weights."""
    cache: dict = {}

    def make(kind: str = "t2i"):
        if kind not in cache:
            if "components" not in cache:
                root = tmp_path_factory.mktemp("qwen-image")
                cache["root"], cache["components"] = root, build_components(root / "tok")
            path = save_checkpoint(kind, cache["components"], cache["root"] / kind)
            cache[kind] = (path, build_pipeline(kind, cache["components"]))
        return cache[kind]

    return make
