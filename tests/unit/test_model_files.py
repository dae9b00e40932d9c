"""The torch-free tokenizer the cache service uses: exactly transformers' ids, or not used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from asyncopd.models.files import PROJECT_ROOT, light_tokenizer
from asyncopd.models.loading import load_tokenizer
from transformers import AutoConfig

pytestmark = pytest.mark.unit

TEXTS = ["", "a", "12+7=", "Q: 3*4+5-2=? A:", "  spaced   out  ", "unknown ☃ chars\n\tand tabs", "<eos>"]


@pytest.mark.parametrize("model", ["assets/toy-student", "assets/toy-teacher"])
def test_same_ids_and_vocabulary_as_transformers(model: str) -> None:
    light = light_tokenizer(model)
    assert light is not None, "the shipped toy models take the light path"
    tokenize, vocab = light
    full = load_tokenizer(model)
    for text in TEXTS:
        assert list(tokenize(text)) == list(full(text, add_special_tokens=False)["input_ids"]), text
    embedding = int(getattr(AutoConfig.from_pretrained(PROJECT_ROOT / model), "vocab_size", 0))
    assert vocab == max(len(full), embedding)


def test_a_larger_embedding_than_the_tokenizer_sets_the_vocabulary(tmp_path: Path) -> None:
    model = shutil.copytree(PROJECT_ROOT / "assets/toy-student", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 4096
    (model / "config.json").write_text(json.dumps(config))
    light = light_tokenizer(str(model))
    assert light is not None and light[1] == 4096


def test_falls_back_where_it_would_not_be_exact(tmp_path: Path) -> None:
    assert light_tokenizer("Qwen/Qwen3-0.6B") is None, "a hub name: transformers downloads and loads it"
    model = shutil.copytree(PROJECT_ROOT / "assets/toy-student", tmp_path / "m")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer"  # adds prefix-space handling of its own
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert light_tokenizer(str(model)) is None
    (model / "tokenizer.json").unlink()
    assert light_tokenizer(str(model)) is None


def test_the_cache_service_starts_without_importing_torch() -> None:
    # what `asyncopd serve cache` runs before serving: the CLI, the cache's modules, its tokenizer
    code = (
        "import sys\n"
        "from asyncopd.cli import build_parser\n"
        "build_parser('serve')\n"
        "from asyncopd.cache.main import student_tokenizer\n"
        "from asyncopd.config import load_config\n"
        "tokenize, vocab = student_tokenizer(load_config('configs/toy.yaml', []))\n"
        "assert list(tokenize('1+1=')), 'tokenizes'\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
