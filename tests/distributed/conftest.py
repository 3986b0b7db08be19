"""The tiny character-level model shared by the distributed tests (see tests/cli)."""

from __future__ import annotations

import pytest

from tests.cli.tiny_text_model import build_text_model

CONTEXT = 256  # the tiny model's max_position_embeddings; its tokens are characters


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("distributed-model"))
