"""Top-1 accuracy, FLOPs and params of every configuration, appended to eval.jsonl (resumable, scales out).

Under torchrun (`torchrun --nproc_per_node N -m snexport.cli.app evaluate BUILD`) the ranks share the work by
configuration, not by data: each configuration is a full, independent pass over the validation set and is one line
of eval.jsonl, so a configuration evaluated on any rank runs exactly the batches, in the order, of a single process
and gives the same record; there is no per-sample count to reduce, and resuming stays per configuration. (Sharding
the data would reduce counts per configuration instead, and change batch compositions between world sizes.)

The work goes in rounds of one configuration per rank, most expensive first, so a round's configurations cost about
the same: the ranks wait on each other at most about one configuration's time over the whole run. After each round
the ranks exchange their records and rank 0 alone appends them (it is the only writer, so lines never interleave,
and one round is all a kill can lose).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from snexport.records import EvalResult


def top1(module, loader, device="cpu") -> tuple[float, int]:
    import torch

    correct = total = 0
    if hasattr(module, "eval"):
        module.eval()
    with torch.inference_mode():
        for x, y in loader:
            correct += int((module(x.to(device)).argmax(dim=1).cpu() == y).sum())
            total += len(y)
    return 100.0 * correct / max(total, 1), total


def rounds(todo: Sequence, world: int) -> list[list]:
    """`todo` (configurations with .gflops and .id) in rounds of at most `world`; rank r runs item r of a round.

    Most expensive first: each round holds neighbours in cost, so nobody waits long for a round to finish, and
    the cheap ones come last, when a kill is most likely to have left only a few to redo. Deterministic, so every
    rank derives the same rounds from the same list.
    """
    ordered = sorted(todo, key=lambda s: (-s.gflops, s.id))
    return [ordered[i:i + world] for i in range(0, len(ordered), world)]


def _finished(build, dataset: str) -> tuple[str, list[dict]]:
    """The weights' hash and the records already in eval.jsonl for these weights and this dataset."""
    weights_hash = build.weights_hash()
    return weights_hash, [r.to_dict() for r in build.read_eval(weights_hash).values() if r.dataset == dataset]


def evaluate_build(build, stitch_ids: Optional[Iterable[str]] = None, data: Optional[str] = None,
                   show_progress: bool = True, batch_size: int = 256) -> list[EvalResult]:
    """Evaluate the requested configurations (default: all); skips those already done for these weights.

    Under torchrun every rank returns the same list; only rank 0 writes eval.jsonl and shows progress.
    """
    from snexport.data.distributed import joined_ranks
    from snexport.progress import progress_task

    plan = build.load_plan()
    wanted = [plan.get(i) for i in stitch_ids] if stitch_ids else list(plan.stitches)
    with joined_ranks() as ranks:
        splits = None
        if build.accuracy_known:
            from snexport.data import open_data

            spec0 = plan.anchors[0]
            splits = open_data(data or build.info().get("data") or None, spec0.input_shape, spec0.num_classes,
                               batch_size=batch_size)
        dataset = splits.name if splits is not None else "unknown (random-init anchors)"
        # Rank 0 reads what is done and every rank takes its word: once rank 0 starts appending, a peer reading
        # eval.jsonl itself could see a different file. Reuse a result only for the same weights and dataset.
        weights_hash, done_rows = ranks.on_main(lambda: _finished(build, dataset))
        done = {row["stitch_id"]: EvalResult.from_dict(row) for row in done_rows}
        todo = [s for s in wanted if s.id not in done]
        results = {s.id: done[s.id] for s in wanted if s.id in done}
        if todo and splits is None:
            # Random-init anchors: accuracy is unknown, never a number (architecture-only build).
            for s in todo:
                rec = EvalResult(s.id, None, s.gflops, s.params, 0, dataset, weights_hash)
                if ranks.is_main:
                    build.append_eval(rec)
                results[s.id] = rec
        elif todo:
            net = build.load_snnet().to(ranks.device).eval()
            with progress_task("evaluating configurations", len(todo), show_progress and ranks.is_main) as advance:
                for batch in rounds(todo, ranks.world):
                    mine = batch[ranks.rank] if ranks.rank < len(batch) else None
                    rec = None
                    if mine is not None:
                        acc, n = top1(lambda x, sid=mine.id: net(x, sid), splits.val, ranks.device)
                        rec = EvalResult(mine.id, round(acc, 3), mine.gflops, mine.params, n, splits.name,
                                         weights_hash)
                    # Every rank joins every exchange, also one with nothing to contribute this round.
                    for row in ranks.all_gather(rec.to_dict() if rec else None):
                        if row is None:
                            continue
                        finished = EvalResult.from_dict(row)
                        if ranks.is_main:
                            build.append_eval(finished)
                        results[finished.stitch_id] = finished
                    advance(len(batch))
    return sorted(results.values(), key=lambda r: (r.gflops, r.stitch_id))
