"""`asyncopd bench weightsync --delta`: dense vs delta weight sync (`weightsync.delta`) side by side.

Two parts, one run:

1. *What a real optimizer step changes.* A small trained model (`assets/toy-teacher`, 644k
   parameters) takes AdamW steps at `--lr` on real toy-task batches (language-model loss over
   prompt + response), with fp32 master weights cast to bf16 for sync and with the weights held
   in bf16 themselves; after every step it counts the bf16 words that changed since the step
   before and what `asyncopd.weightsync.delta` would send for them (bytes of the encoded
   buckets vs the dense buckets).
2. *Bytes and time on the wire.* A randomly initialised Qwen3-shaped model of about `--model-mb`
   of bf16 weights (fp32 master, AdamW at `--lr`, random-token batches) is published after every
   step by two learners at once — one dense (`weightsync.delta: false`), one delta — to the same
   R replica processes on gloo loopback (each replica runs one subscriber per learner and copies
   every tensor into its model). Publishes alternate between the two, so both see the same load.
   Per publish: bytes sent per replica, the transfer (broadcast + loads + acks) and the learner's
   packing (+ encoding, for the delta) seconds. At the end every replica's weights are compared
   with the learner's bf16 weights by digest.

It measures; it imports the product and knows nothing the product does not expose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from asyncopd.config.endpoints import ServerConfig
from asyncopd.config.weightsync import WeightSyncConfig
from asyncopd.learner.servicer import SERVICE_NAME, LearnerServicer, Progress, add_to_server
from asyncopd.weightsync.collective import CollectiveBroadcast
from asyncopd.weightsync.groups import connect_store, host_store
from asyncopd.weightsync.subscriber import run_subscriber
from asyncopd.weightsync.transport import Delta, Snapshot
from asyncopd.wire.rpc import start_server

_MIB = 1 << 20
_TOY = Path(__file__).resolve().parents[4] / "assets" / "toy-teacher"


def _bf16_words(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to(torch.bfloat16).reshape(-1).view(torch.int16).clone() for n, t in named}


def _digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named, key=lambda nt: nt[0]):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# ---- 1. what an AdamW step changes, on the trained toy model -----------------------------------


def _toy_batches(tokenizer: Any, batch: int, steps: int) -> list[dict[str, torch.Tensor]]:
    from asyncopd.tasks.toy.task import sample_problems

    out = []
    for step in range(steps):
        problems = sample_problems("train", batch, seed=step)
        texts = [p.prompt + p.response + tokenizer.eos_token for p in problems]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def changed_by_steps(lr: float, steps: int, master: torch.dtype, bucket_mb: float) -> list[dict[str, Any]]:
    """Per AdamW step on the toy teacher: the fraction of bf16 words changed and delta/dense bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(_TOY, dtype=master)
    tokenizer = AutoTokenizer.from_pretrained(_TOY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    config = WeightSyncConfig(bucket_mb=bucket_mb)
    named = lambda: [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]  # noqa: E731
    previous = Snapshot.take(0, named(), None, config, torch.device("cpu"))
    out = []
    for step, batch in enumerate(_toy_batches(tokenizer, 32, steps), start=1):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        snapshot = Snapshot.take(step, named(), previous, config, torch.device("cpu"))
        delta = Delta.between(previous, snapshot)
        assert delta is not None
        words = snapshot.nbytes // 2
        out.append(
            {
                "step": step,
                "loss": float(loss.detach()),
                "changed_fraction": sum(b.changed for b in delta.buckets) / words,
                "bytes_ratio": delta.nbytes / snapshot.nbytes,
                "encodings": ",".join(sorted({b.encoding for b in delta.buckets})),
            }
        )
        previous = snapshot
    return out


# ---- 2. dense vs delta on the wire --------------------------------------------------------------


def _qwen3(model_mb: float, seed: int) -> Any:
    """A random Qwen3 (HF init) of about `model_mb` MiB of bf16 weights: hidden 1024, vocab 8192."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, vocab = 1024, 8192
    per_layer = 12 * hidden * hidden  # q, o: h^2; k, v: h^2 / 2; MLP 3 x h x 3h
    layers = max(1, round((model_mb * _MIB / 2 - vocab * hidden) / per_layer))
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 256,
        head_dim=128,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


def _replica(spec: dict[str, Any]) -> None:
    rank = int(spec["rank"])
    torch.set_num_threads(1)
    # One model per learner, so each learner's weights are checked on their own at the end.
    models = {kind: {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in spec["shapes"]} for kind in ("dense", "delta")}
    stop = threading.Event()
    seen: dict[str, list[int]] = {"dense": [], "delta": []}

    def applier(kind: str):  # type: ignore[no-untyped-def]
        def apply(version: int, named: Iterable[tuple[str, torch.Tensor]]) -> None:
            for name, tensor in named:  # a load: copy every tensor out of the stream
                models[kind][name].copy_(tensor)
            seen[kind].append(version)

        return apply

    config = WeightSyncConfig.model_validate_json(spec["config"])
    threads = [
        threading.Thread(target=run_subscriber, args=(spec[kind], f"bench-{kind}-{rank}", applier(kind), stop, config))
        for kind in ("dense", "delta")
    ]
    for t in threads:
        t.start()
    store = connect_store("127.0.0.1", int(spec["store_port"]), 60.0)
    store.wait(["stop"], timedelta(days=1))
    stop.set()
    for t in threads:
        t.join(timeout=60)
    digests = {kind: _digest(m.items()) for kind, m in models.items()}
    store.set(f"result/{rank}", json.dumps({"versions": seen, "digests": digests}))


def _publish(transport: CollectiveBroadcast, version: int, named: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    before = transport.sent_bytes
    report = transport.publish(version, named)
    if report.rebuilds:
        raise RuntimeError("the group was rebuilt during the measurement")
    return {
        "bytes": (transport.sent_bytes - before) / max(1, report.replicas),
        "sync_s": report.sync_seconds,
        "pack_s": report.pack_seconds,
    }


def _measure(replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    model = _qwen3(args.model_mb, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    named = lambda: [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]  # noqa: E731
    cfg = WeightSyncConfig(bucket_mb=args.bucket_mb, timeout_s=120.0, checksum=args.checksum)
    transports = {
        "dense": CollectiveBroadcast(cfg),
        "delta": CollectiveBroadcast(cfg.model_copy(update={"delta": True})),
    }
    servers = {
        k: start_server(ServerConfig(port=0), [add_to_server(LearnerServicer(t, Progress))], [SERVICE_NAME])
        for k, t in transports.items()
    }
    store = host_store("127.0.0.1", 0, 60.0)
    spec = {
        "store_port": store.port,
        "dense": servers["dense"].address,
        "delta": servers["delta"].address,
        "config": cfg.model_dump_json(),
        "shapes": [(n, list(t.shape)) for n, t in named()],
    }
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_replica, args=({**spec, "rank": r},), daemon=True) for r in range(1, replicas + 1)]
    rows: dict[str, list[dict[str, float]]] = {"dense": [], "delta": []}
    fractions: list[float] = []
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 300
        for transport in transports.values():
            transport.publish(1, named())  # forms the groups, delivers version 1 (dense for both)
            while len(transport.replicas) < replicas:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(transport.replicas)} of {replicas} replicas joined")
                time.sleep(0.01)
                transport.sync()
        generator = torch.Generator().manual_seed(1)
        for version in range(2, args.repeats + 2):
            before = _bf16_words(model.named_parameters())
            ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=generator)
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            after = _bf16_words(model.named_parameters())
            words = sum(int(t.numel()) for t in after.values())
            fractions.append(sum(int((after[n] != before[n]).sum()) for n in after) / words)
            weights = named()
            order = ("dense", "delta") if version % 2 else ("delta", "dense")  # neither always goes first
            for kind in order:
                rows[kind].append(_publish(transports[kind], version, weights))
        final = _digest(named())
        store.set("stop", "1")
        results = [json.loads(store.get(f"result/{r}")) for r in range(1, replicas + 1)]
    finally:
        store.set("stop", "1")
        for transport in transports.values():
            transport.close()
        for server in servers.values():
            server.stop(0)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    last = args.repeats + 1
    for r in results:
        for kind in ("dense", "delta"):
            if r["versions"][kind][-1] != last or r["digests"][kind] != final:
                raise RuntimeError(f"a replica's {kind} weights differ from the learner's after version {last}")

    def med(kind: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[kind])

    return {
        "replicas": replicas,
        "dense_bytes": med("dense", "bytes"),
        "delta_bytes": med("delta", "bytes"),
        "changed_fraction": statistics.median(fractions),
        "bytes_ratio": med("delta", "bytes") / med("dense", "bytes"),
        "dense_sync_s": med("dense", "sync_s"),
        "delta_sync_s": med("delta", "sync_s"),
        "sync_ratio": med("delta", "sync_s") / med("dense", "sync_s"),
        "dense_pack_s": med("dense", "pack_s"),
        "delta_pack_s": med("delta", "pack_s"),
        "end_to_end_ratio": (med("delta", "sync_s") + med("delta", "pack_s"))
        / (med("dense", "sync_s") + med("dense", "pack_s")),
        "exact": True,
    }


def run(args: argparse.Namespace) -> int:
    counts = [int(x) for x in str(args.replicas).split(",") if x]
    print(f"1. AdamW lr {args.lr:g} on {_TOY.name} (trained, 644k params), toy-task batches of 32, bf16 sync:")
    print(f"{'master':>8} {'step':>4} {'loss':>7} {'changed %':>9} {'delta/dense bytes':>17}  encodings")
    for master in (torch.float32, torch.bfloat16):
        for row in changed_by_steps(args.lr, args.delta_steps, master, bucket_mb=0.25):
            if args.json:
                print(json.dumps({"part": "toy", "master": str(master), **row}))
            else:
                print(
                    f"{str(master).removeprefix('torch.'):>8} {row['step']:>4} {row['loss']:>7.3f} "
                    f"{100 * row['changed_fraction']:>9.3f} {row['bytes_ratio']:>17.3f}  {row['encodings']}"
                )
    print(
        f"2. dense vs delta, gloo on loopback: random Qwen3 of ~{args.model_mb:.0f} MiB bf16, fp32 master, "
        f"AdamW lr {args.lr:g}, bucket {args.bucket_mb:g} MiB, median of {args.repeats}, checksum={args.checksum}"
    )
    print(
        f"{'R':>3} {'changed %':>9} {'dense MiB':>9} {'delta MiB':>9} {'bytes':>6} {'dense s':>8} {'delta s':>8} "
        f"{'time':>6} {'pack s':>7} {'pack+enc s':>10} {'e2e':>6}"
    )
    for replicas in counts:
        m = _measure(replicas, args)
        if args.json:
            print(json.dumps(m))
        else:
            print(
                f"{replicas:>3} {100 * m['changed_fraction']:>9.3f} {m['dense_bytes'] / _MIB:>9.2f} "
                f"{m['delta_bytes'] / _MIB:>9.2f} {m['bytes_ratio']:>6.3f} {m['dense_sync_s']:>8.3f} "
                f"{m['delta_sync_s']:>8.3f} {m['sync_ratio']:>6.2f} {m['dense_pack_s']:>7.3f} "
                f"{m['delta_pack_s']:>10.3f} {m['end_to_end_ratio']:>6.2f}"
            )
    print("(bytes, time, e2e: delta / dense; every replica's weights matched the learner's bf16 weights)")
    return 0
