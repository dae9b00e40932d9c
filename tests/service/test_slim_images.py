"""The slim images' roles (cache, autoscaler) run on the core dependencies and their extras alone.

deploy/Dockerfile's `cache` and `autoscaler` targets install the package with the extras their
`CACHE_EXTRAS` / `AUTOSCALER_EXTRAS` build args name, and nothing else: no torch, transformers or
matplotlib. No container can be built here, so each image is emulated in a fresh interpreter of
the dev venv: every module whose distribution is outside the transitive requirements of
pyproject.toml's core + those extras is made unimportable (as it is absent from the image; an
optional `try: import` then takes its fallback, as it would there), and the role then does
what its process does: the cache starts for real against the test Redis, answers a Stats RPC and
stops; the autoscaler ticks against unreachable services and stops.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_cache_harness import SHARED_REDIS, unique_prefix, wipe

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "matplotlib")

# Runs first in the emulated interpreter: modules of distributions the image lacks do not exist.
ABSENT = """
import importlib.abc, json, sys
BLOCKED = frozenset(json.loads(sys.argv[1]))
refused = set()
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            refused.add(name.partition(".")[0])
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in this image)", name=name)
        return None
sys.meta_path.insert(0, NotInImage())
"""
REPORT = """
heavy = sorted(m for m in HEAVY if m in sys.modules)
print("SLIM-REPORT " + json.dumps({"heavy": heavy, "refused": sorted(refused)}))
"""

CACHE = """
from asyncopd.cli import build_parser
build_parser("serve")
from asyncopd.cache.main import start_cache
from asyncopd.config import load_config
from asyncopd.wire.cache_client import CacheClient
from asyncopd.wire.rpc import channel
config = load_config("configs/toy.yaml", json.loads(sys.argv[2]))
cache = start_cache(config, "cache")
ch = channel(cache.address)
try:
    client = CacheClient(ch, timeout_s=30.0)
    prompts, _, _ = client.acquire_prompts("rollout-0", 2)  # the toy task, tokenized and leased
    assert len(prompts) == 2 and all(len(p.prompt_ids) > 0 for p in prompts), prompts
    assert client.stats()["admitted"] == 2
finally:
    ch.close()
    cache.stop()
"""

AUTOSCALER = """
import threading
from asyncopd.cli import build_parser
build_parser("serve")
from asyncopd.autoscaler.main import run
from asyncopd.config import load_config
from kubernetes.client import ApiClient, Configuration
config = load_config("configs/toy.yaml", json.loads(sys.argv[2]))
api = Configuration()
api.host = "http://127.0.0.1:9"  # never reached: no tick gets past the pipeline RPCs
stop = threading.Event()
threading.Timer(1.5, stop.set).start()
run(config, "a0", ApiClient(api), stop)
"""


def dockerfile_extras(role: str) -> list[str]:
    """The extras deploy/Dockerfile installs for a slim role (its `<ROLE>_EXTRAS` build arg)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    match = re.search(rf"^ARG {role.upper()}_EXTRAS=\"?([a-z0-9,]*)\"?$", text, re.MULTILINE)
    assert match, f"deploy/Dockerfile declares no ARG {role.upper()}_EXTRAS"
    return [e for e in match.group(1).split(",") if e]


def requirement_closure(extras: list[str]) -> set[str]:
    """Canonical names of every distribution `pip install asyncopd[extras]` installs (as far as
    this venv's metadata tells: markers evaluated here, extras followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    todo = [(Requirement(r), ()) for r in project["dependencies"]]
    todo += [(Requirement(r), ()) for e in extras for r in optional[e]]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    names: set[str] = set()
    while todo:
        req, _ = todo.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue  # not installed here, so nothing here can import it either
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append((sub, ()))
    return names


def absent_modules(allowed: set[str]) -> list[str]:
    """Top-level modules of installed distributions outside `allowed` (and outside asyncopd)."""
    allowed = allowed | {"asyncopd"}
    return sorted(
        top
        for top, dists in md.packages_distributions().items()
        if not any(canonicalize_name(d) in allowed for d in dists)
    )


def run_in_image(role: str, code: str, overrides: list[str]) -> dict[str, list[str]]:
    extras = dockerfile_extras(role)
    allowed = requirement_closure(extras)
    for heavy in HEAVY:
        assert heavy not in allowed, f"the {role} image ({extras}) would install {heavy}: pyproject pulls it in"
    blocked = absent_modules(allowed)
    assert {"torch", "transformers", "matplotlib"} <= set(blocked), "the emulation must refuse the heavy modules"
    program = ABSENT + f"HEAVY = {HEAVY!r}\n" + code + REPORT
    proc = subprocess.run(
        [sys.executable, "-c", program, json.dumps(blocked), json.dumps(overrides)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{role} fails without what its image lacks:\n{proc.stderr[-4000:]}"
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("SLIM-REPORT ")]
    report: dict[str, list[str]] = json.loads(line.removeprefix("SLIM-REPORT "))
    assert report["heavy"] == [], report
    return report


def test_the_cache_image_serves_without_torch_transformers_or_matplotlib() -> None:
    prefix = unique_prefix("slim")
    try:
        run_in_image(
            "cache",
            CACHE,
            [
                f"redis.url={SHARED_REDIS}",
                f"redis.key_prefix={prefix}",
                "cache.server.port=0",
                "cache.hold_until_learner=false",
            ],
        )
    finally:
        wipe(SHARED_REDIS, prefix)


def test_the_autoscaler_image_ticks_without_torch_transformers_or_matplotlib() -> None:
    dead = "127.0.0.1:9"
    run_in_image(
        "autoscaler",
        AUTOSCALER,
        [f"endpoints.cache={dead}", f"endpoints.learner={dead}", "autoscaler.namespace=ns",
         "autoscaler.interval_s=0.2", "autoscaler.server.port=0"],
    )  # fmt: skip


def test_the_emulation_refuses_what_an_image_lacks() -> None:
    # The same machinery with the heavy modules imported on purpose must fail, or it proves nothing.
    with pytest.raises(AssertionError, match="not installed in this image"):
        run_in_image("cache", "import asyncopd.models.loading\n", [])
