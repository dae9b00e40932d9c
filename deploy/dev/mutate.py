"""`make mutate`: mutation testing of the modules that decide correctness, with a score per module.

Python modules are mutated by cosmic-ray (PyPI; `make mutate` installs it into its own venv,
.tools/mutate-venv, since it only drives subprocesses). The cache's Lua scripts are out of any
Python tool's reach, so a short list of hand-written mutants (flipped comparisons in the
staleness, budget and eviction checks) is applied by this script the same way.

Nothing touches the working tree: services/ is copied to the session folder (default
runs/mutate/<time>/) and every test run imports that copy (PYTHONPATH), with the repository's
tests and venv. Each mutant runs its module's fast tests with `-x`; a mutant is killed when they
fail (or time out), survived when they pass.

To fit a loaded 2-core machine, each Python module is sampled: one mutant per mutated source
position (operator picked at random), then at most --max-per-module positions (seeded, so runs
compare). `--retest DIR` re-runs only the survivors of an earlier session (new tests can kill a
survivor, never revive a killed mutant) against fresh copies of the sources and tests.

Run with the mutate venv's python (it imports cosmic_ray): `make mutate MUTATE_ARGS="..."`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

REPO = Path(__file__).resolve().parents[2]
PYTEST = REPO / ".venv" / "bin" / "pytest"
TOOL_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # path under services/asyncopd
    tests: tuple[str, ...]  # pytest arguments (relative to the repository)


TARGETS = (
    Target(
        "cache.policy",
        "cache/policy.py",
        (
            "tests/unit/test_cache_policy.py",
            "tests/unit/test_cache_policy_shared.py",
            "tests/service/test_cache_policy_boundary.py",
        ),
    ),
    Target(
        "opd.estimators",
        "opd/estimators.py",
        (
            "tests/unit/test_opd_estimators.py",
            "tests/unit/test_opd_mc_properties.py",
            "tests/unit/test_opd_contracts.py",
        ),
    ),
    Target(
        "opd.corrections",
        "opd/corrections.py",
        (
            "tests/unit/test_opd_estimators.py",  # the m2po_clip and decoupled references live there
            "tests/unit/test_opd_mc_properties.py",
            "tests/unit/test_opd_loss.py",
            "tests/unit/test_opd_contracts.py",
        ),
    ),
    Target(
        "learner.batching",
        "learner/batching.py",
        ("tests/unit/test_learner_batching.py", "tests/unit/test_learner_collate.py"),
    ),
    Target(
        "weightsync.manifest",
        "weightsync/manifest.py",
        (
            "tests/unit/test_weightsync_manifest.py",
            "tests/service/test_weightsync_transport.py::test_buckets_round_trip_every_dtype_bit_exact",
            "tests/service/test_weightsync_transport.py::test_manifest_json_is_validated",
            "tests/service/test_weightsync_transport.py::test_chunks_slice_large_tensors_and_reassemble",
            "tests/service/test_weightsync.py::test_manifest_rejects_a_model_mismatch",
        ),
    ),
)

LUA_TESTS = (
    "tests/service/test_cache_claims.py",
    "tests/service/test_cache_policy_boundary.py",
    "tests/service/test_cache_eviction.py",
    "tests/service/test_cache_budget_exact.py",
    "tests/service/test_cache_poison.py",
)


@dataclass(frozen=True)
class LuaMutant:
    name: str
    file: str  # under services/asyncopd/cache/lua
    old: str  # must occur exactly once
    new: str


LUA_MUTANTS = (
    LuaMutant(
        "put: stale boundary < -> <=",
        "put_rollouts.lua",
        "elseif ov < oldest_usable then",
        "elseif ov <= oldest_usable then",
    ),
    LuaMutant("put: stale check off", "put_rollouts.lua", "elseif ov < oldest_usable then", "elseif false then"),
    LuaMutant(
        "put: budget ignores held bytes",
        "common.lua",
        "plan_evictions(held + total - budget,",
        "plan_evictions(total - budget,",
    ),
    LuaMutant(
        "evict: nothing needed when need <= 0 -> < 0",
        "common.lua",
        "if need <= 0 then return victims end",
        "if need < 0 then return victims end",
    ),
    LuaMutant("evict: backpressure evicts", "common.lua", "if policy == 'backpressure' then return nil end", ""),
    LuaMutant(
        "evict: stop once freed >= need -> >",
        "common.lua",
        "if freed >= need then break end",
        "if freed > need then break end",
    ),
    LuaMutant(
        "evict: stalest-first stale boundary < -> <=",
        "common.lua",
        "num(f[2]) < oldest_usable then reason",
        "num(f[2]) <= oldest_usable then reason",
    ),
    LuaMutant(
        "evict: candidates run out -> evict what there is",
        "common.lua",
        "if #ids == 0 then return nil end",
        "if #ids == 0 then return victims end",
    ),
    LuaMutant(
        "pull: stale range inclusive", "pull.lua", "'(' .. fmt(oldest_usable * SHIFT)", "fmt(oldest_usable * SHIFT)"
    ),
    LuaMutant(
        "pull: serves fewer than asked",
        "pull.lua",
        "redis.call('ZCARD', k('scored')) < size then",
        "redis.call('ZCARD', k('scored')) < size - 1 then",
    ),
    LuaMutant(
        "unscored: stale boundary < -> <=",
        "claim.lua",
        "if num(f[3]) < oldest_usable then",
        "if num(f[3]) <= oldest_usable then",
    ),
    LuaMutant(
        "claim: one teacher delivery past the cap", "claim.lua", "num(f[2]) >= maxd then", "num(f[2]) > maxd then"
    ),
    LuaMutant("expire: one batch claim past the cap", "common.lua", "num(f[4]) >= maxd then", "num(f[4]) > maxd then"),
    LuaMutant(
        "acquire: admits past the window",
        "acquire.lua",
        "while got < want and free > 0 do",
        "while got < want and free >= 0 do",
    ),
)


# Survivors judged equivalent (no test can tell them apart): a fragment of the survivor line -> why.
EQUIVALENT = {
    "mask: Tensor ** None": "an annotation: with `from __future__ import annotations` it is never evaluated",
    "max(float(tau_sq[k]), -1.0)": "tau_sq[k] > 0 by construction (water-filling over budget); the max is a guard",
    "per_position[ -1][0].shape[1]": "every sample's K is the same (checked just before), so first = last",
    "non_blocking=False": "same values; only whether a host->device copy may overlap (none on CPU)",
    "pull: stale range inclusive": "scores are ov * 2^32 + seq with seq >= 1 (INCR): none equals the bound",
}


def copy_sources(session: Path) -> Path:
    """services/ of the working tree (generated stubs included) -> session/services; returns it."""
    dest = session / "services"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(REPO / "services", dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def test_env(services: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(services), "PYTHONDONTWRITEBYTECODE": "1"}


def pytest_command(tests: tuple[str, ...]) -> list[str]:
    return [str(PYTEST), "-x", "-q", "-p", "no:cacheprovider", *tests]


def check_baseline(services: Path, tests: tuple[str, ...], what: str) -> None:
    """The unmutated copy must pass the tests, or every mutant would count as killed."""
    run = subprocess.run(
        pytest_command(tests), check=False, cwd=REPO, env=test_env(services), capture_output=True, text=True
    )
    if run.returncode != 0:
        sys.exit(f"{what}: the tests fail on the unmutated sources:\n{run.stdout[-3000:]}")


# ---- Python modules (cosmic-ray) -------------------------------------------------------------


def write_config(target: Target, services: Path, folder: Path, timeout_s: float) -> Path:
    """The session's cosmic-ray config; rewritten on --retest, so the re-run uses today's tests."""
    config = folder / f"{target.name}.toml"
    command = " ".join(pytest_command(target.tests))
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{services / "asyncopd" / target.module}"\n'
        f"timeout = {timeout_s}\n"
        "excluded-modules = []\n"
        f'test-command = "{command}"\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    return config


def init_session(target: Target, services: Path, folder: Path, *, max_n: int, seed: int, timeout_s: float) -> Path:
    config = write_config(target, services, folder, timeout_s)
    db_path = folder / f"{target.name}.sqlite"
    subprocess.run([str(TOOL_BIN / "cosmic-ray"), "init", str(config), str(db_path)], check=True, cwd=REPO)
    rng = random.Random(f"{seed}:{target.name}")
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        by_position: dict[tuple[tuple[int, int], tuple[int, int]], list[str]] = {}
        for item in db.work_items:
            mutation = item.mutations[0]
            by_position.setdefault((tuple(mutation.start_pos), tuple(mutation.end_pos)), []).append(item.job_id)
        positions = sorted(by_position)
        chosen_positions = set(rng.sample(positions, min(max_n, len(positions)))) if max_n else set(positions)
        keep = {rng.choice(by_position[p]) for p in chosen_positions}
        skipped = [item.job_id for item in db.work_items if item.job_id not in keep]
        if skipped:
            db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    total = sum(len(v) for v in by_position.values())
    print(f"{target.name}: {total} mutants at {len(positions)} positions; running {len(keep)}", flush=True)
    return config


def reopen_survivors(db_path: Path) -> int:
    """Make an earlier session's survivors pending again; returns how many."""
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        survivors = [job for job, result in db.results if result.test_outcome == TestOutcome.SURVIVED]
        if survivors:
            from cosmic_ray.work_db import WorkResultStorage

            with db._session_maker.begin() as session:  # no public way to clear one result
                session.query(WorkResultStorage).filter(WorkResultStorage.job_id.in_(survivors)).delete()
    return len(survivors)


def run_session(services: Path, config: Path) -> None:
    db_path = config.with_suffix(".sqlite")
    subprocess.run(
        [str(TOOL_BIN / "cosmic-ray"), "exec", str(config), str(db_path)], check=True, cwd=REPO, env=test_env(services)
    )


def python_results(target: Target, folder: Path) -> dict[str, object]:
    db_path = folder / f"{target.name}.sqlite"
    killed, survivors, incompetent = 0, [], 0
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        items = {item.job_id: item for item in db.work_items}
        for job, result in db.results:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                m = items[job].mutations[0]
                diff = [
                    line
                    for line in (result.diff or "").splitlines()
                    if line[:1] in "+-" and not line.startswith(("+++", "---"))
                ]
                survivors.append(
                    f"{target.module}:{m.start_pos[0]} {m.definition_name} {m.operator_name.split('/')[-1]}: "
                    + " => ".join(s.strip() for s in diff)
                )
            elif result.test_outcome == TestOutcome.INCOMPETENT:
                incompetent += 1
            elif result.test_outcome == TestOutcome.KILLED:
                killed += 1
    return {"killed": killed + incompetent, "incompetent": incompetent, "survivors": sorted(survivors)}


# ---- Lua (hand-written mutants) -----------------------------------------------------------------


def run_lua(services: Path, folder: Path, only: set[str] | None, timeout_s: float) -> dict[str, object]:
    lua = services / "asyncopd" / "cache" / "lua"
    killed, survivors, missing = 0, [], []
    for mutant in LUA_MUTANTS:
        if only is not None and not any(line.startswith(f"{mutant.file}: {mutant.name}: ") for line in only):
            continue
        path = lua / mutant.file
        original = path.read_text()
        if original.count(mutant.old) != 1:
            missing.append(f"{mutant.file}: {mutant.name} (text not found once: the script changed)")
            continue
        path.write_text(original.replace(mutant.old, mutant.new))
        try:
            run = subprocess.run(
                pytest_command(LUA_TESTS),
                check=False,
                cwd=REPO,
                env=test_env(services),
                capture_output=True,
                timeout=timeout_s,
            )
            outcome = "killed" if run.returncode != 0 else "survived"
        except subprocess.TimeoutExpired:
            outcome = "killed"
        finally:
            path.write_text(original)
        print(f"lua {mutant.file}: {mutant.name}: {outcome}", flush=True)
        if outcome == "killed":
            killed += 1
        else:
            survivors.append(f"{mutant.file}: {mutant.name}: {mutant.old!r} -> {mutant.new!r}")
    return {"killed": killed, "incompetent": 0, "survivors": survivors, "not_applied": missing}


# ---- report ---------------------------------------------------------------------------------------


def report(results: dict[str, dict[str, object]], previous: dict[str, dict[str, object]] | None) -> None:
    print("\nmutation score per module (killed / run; survivors below)")
    for name, r in results.items():
        survivors = r["survivors"]
        assert isinstance(survivors, list)
        killed = int(r["killed"])  # type: ignore[call-overload]
        if previous is not None and name in previous:
            # a retest ran only the earlier survivors: the earlier kills still count
            before = previous[name]
            killed += int(before["killed"])  # type: ignore[call-overload]
        run = killed + len(survivors)
        score = f"{100 * killed / run:5.1f}%" if run else "  n/a"
        print(f"  {name:22s} {score}  {killed}/{run}")
    for name, r in results.items():
        for line in r["survivors"]:  # type: ignore[attr-defined]
            why = next((reason for fragment, reason in EQUIVALENT.items() if fragment in line), None)
            print(f"  {'EQUIVALENT' if why else 'SURVIVED'} {name}: {line}" + (f"\n      ({why})" if why else ""))
        for line in r.get("not_applied", []):  # type: ignore[attr-defined]
            print(f"  NOT APPLIED {name}: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-per-module", type=int, default=20, help="sampled mutants per Python module (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modules", default="", help="comma-separated target names (default: all, and lua)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="one test run's limit (then: killed)")
    parser.add_argument("--out", type=Path, default=None, help="session folder (default runs/mutate/<time>)")
    parser.add_argument("--retest", type=Path, default=None, help="re-run the survivors of this session folder")
    args = parser.parse_args()

    wanted = {m for m in args.modules.split(",") if m}
    targets = [t for t in TARGETS if not wanted or t.name in wanted]
    with_lua = not wanted or "lua" in wanted
    folder = args.retest or args.out or REPO / "runs" / "mutate" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    services = copy_sources(folder)
    previous = json.loads((folder / "results.json").read_text()) if args.retest else None
    started = time.monotonic()
    results: dict[str, dict[str, object]] = {}
    for target in targets:
        present = tuple(t for t in target.tests if (REPO / t.split("::")[0]).exists())
        if not present:
            print(f"{target.name}: none of its tests exist ({', '.join(target.tests)}); not run", flush=True)
            continue
        run_target = Target(target.name, target.module, present)
        check_baseline(services, run_target.tests, target.name)
        if args.retest:
            config = write_config(run_target, services, folder, args.timeout_s)
            print(f"{target.name}: retesting {reopen_survivors(config.with_suffix('.sqlite'))} survivors", flush=True)
        else:
            config = init_session(
                run_target, services, folder, max_n=args.max_per_module, seed=args.seed, timeout_s=args.timeout_s
            )
        run_session(services, config)
        results[target.name] = python_results(target, folder)
        if previous is not None:
            # python_results counted the whole session: earlier kills are already in it
            previous.pop(target.name, None)
    if with_lua:
        check_baseline(services, LUA_TESTS, "lua")
        only = None
        if previous is not None and "lua" in previous:
            only = set(previous["lua"]["survivors"])  # type: ignore[index]
        results["lua"] = run_lua(services, folder, only, args.timeout_s)
    report(results, previous)
    if not args.retest:
        (folder / "results.json").write_text(json.dumps(results, indent=1))
    else:
        (folder / "results-retest.json").write_text(json.dumps(results, indent=1))
    print(f"\nsession: {folder} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
