"""Hub model ids resolve through the Hugging Face cache (here filled by hand, as a
`hf download` on a connected machine would leave it; HF_HUB_OFFLINE=1 in the tests)."""

import shutil

import huggingface_hub.constants as hub_constants
import pytest

from rayd.config import ConfigError
from rayd.models import build_tiny_llama
from rayd.preflight import _resolve


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--rayd-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    build_tiny_llama(tmp_path / "built", layers=1, hidden=32, heads=1)
    shutil.copytree(tmp_path / "built", snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert _resolve("models.student.path", "rayd-test/tiny", 0) == str(snapshot)
    with pytest.raises(ConfigError, match="'rayd-test/other' is not a local folder"):
        _resolve("models.student.path", "rayd-test/other", 0)
