"""The driver's side of checkpoints: each actor's changed clients streamed from the actor and
written here, the manifest kept, a URI run directory pushed; a resumed (or rewound) run's
server state read back and every client's latest file sent to the actors that host it.

Apart from the driver's round loop (`driver`) because it changes with what a checkpoint holds
and how it travels, not with the rounds; the file format itself (folders, the manifest,
COMPLETE, integrity) is `checkpoints`. Actors never get a path: they may run on other nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from raysim import console
from raysim.algorithms import ServerState
from raysim.engine import checkpoints
from raysim.engine.failures import LOST, mark_failed
from raysim.engine.run_state import RunState


def save(driver: RunState, round_: int, state: ServerState) -> None:
    """The server state, then each actor's clients whose state changed since the last
    checkpoint, streamed from the actor and written here (actors never get a path: they may
    run on other nodes); the manifest names every client's latest file; COMPLETE last."""
    folder = checkpoints.folder(driver.run_dir, round_)
    folder.mkdir(parents=True, exist_ok=True)
    manifest, written, complete = dict(driver.manifest), {}, True
    written[checkpoints.relative(folder / checkpoints.SERVER)] = checkpoints.write_server(folder, round_, state)
    streams = {i: actor.save_changed.remote() for i, actor in driver.pool.live()}  # all actors serialize at once; retired ones never
    phase = f"round {round_}: checkpoint, client actors written"
    for n, (i, stream) in enumerate(streams.items()):
        console.report(phase, n, len(streams))
        group = driver.pool.plan[i]
        try:
            saved, path = write_clients(stream, checkpoints.actor_file(folder, i), written, driver.deadline())
        except (*LOST, RayTaskError, OSError) as err:
            if all(spec.id in driver.dead for spec in group):
                continue  # an actor already out of the run: its clients' last states stay as they were
            if isinstance(err, OSError):  # e.g. a full disk: this checkpoint would lose state
                driver.echo(f"round {round_}: could not write {checkpoints.relative(checkpoints.actor_file(folder, i))}: {err}")
            else:
                mark_failed(driver, group[0].id, err)  # a lost actor (recover) ends here: replayed
            complete = False
            continue
        if saved:
            manifest.update({cid: checkpoints.relative(path) for cid in saved})
            driver.pool.actors[i].saved.remote(saved)  # ordered before the actor's next call
    console.report(phase, len(streams), len(streams))
    driver.notes.flush()
    # Files written now stay named even when this checkpoint is incomplete: their clients are
    # not rewritten until they change again (an unwritten file leaves its clients marked changed).
    driver.manifest = {cid: f for cid, f in manifest.items() if cid not in driver.dead}
    driver.known_files.update(written)
    if not complete:
        driver.echo(f"round {round_}: checkpoint incomplete (a client's state could not be written); the previous one stays the latest")
        return
    driver.known_files = checkpoints.complete(folder, round_, driver.manifest, driver.dead, driver.known_files, driver.cfg.checkpoint.keep)
    if driver.mirror is not None:
        push(driver, "the next checkpoint tries again")


def push(driver: RunState, otherwise: str) -> None:
    """The staging copy to the URI; a storage error costs a line, not the run."""
    try:
        driver.mirror.push()
    except OSError as err:  # pyarrow's I/O errors are OSErrors
        driver.echo(f"could not copy the run directory to {driver.mirror.uri} ({str(err).splitlines()[0]}); {otherwise}")


def write_clients(stream: Any, path: Path, written: dict[str, dict[str, Any]], wait_s: float) -> tuple[list[str], Path]:
    """One actor's `save_changed` stream to `path`: (client ids, path); no file when none changed."""
    pieces = stream_values(stream, wait_s)
    saved = next(pieces)
    if saved:
        try:
            written[checkpoints.relative(path)] = checkpoints.write_chunks(pieces, path)
        except OSError:
            for _ in pieces:  # drain: the actor finishes its call and answers the next one
                pass
            raise
    return saved, path


def stream_values(stream: Any, wait_s: float) -> Iterator[Any]:
    """The values of a streaming actor call, each awaited with the deadline (`wait_s`)."""
    while True:
        ready, _ = ray.wait([stream], timeout=wait_s)
        if not ready:
            raise GetTimeoutError(f"no answer within {wait_s:.0f} s")
        try:
            ref = next(stream)
        except StopIteration:
            return
        yield ray.get(ref, timeout=wait_s)


def resume_server(driver: RunState) -> tuple[Path | None, int]:
    """A resumed run's newest usable checkpoint (the ones skipped echoed) and its round; the
    server state, the next round and the outputs put back to it. (None, 0): none usable."""
    checkpoint, skipped = checkpoints.usable(driver.run_dir)
    for line in skipped:
        driver.echo(line)
    if checkpoint is None:
        return None, 0
    driver.state, done = checkpoints.load_server(checkpoint)
    driver.next_round = done + 1
    driver.recorder.load_existing()
    driver.recorder.truncate(done)
    return checkpoint, done


def restore_clients(driver: RunState, folder: Path) -> None:
    """The driver reads each client file the checkpoint names, once, and sends its bytes to
    the actors whose clients it holds; a client in no file starts from the initial state."""
    saved = checkpoints.load_manifest(folder)
    driver.manifest = dict(saved.get("clients", {}))
    driver.known_files = dict(saved["files"])
    for cid, reason in saved.get("dead", {}).items():
        if cid in driver.specs:
            driver.dead[cid] = reason
            driver.notes.say("out of the run since before this checkpoint", f"client {cid}: out of the run since before this checkpoint ({reason}); continuing without it")
    driver.notes.flush()
    root = folder.parent
    contents = {name: ray.put((root / name).read_bytes()) for name in sorted(set(driver.manifest.values()))}
    refs = []
    for i, group in enumerate(driver.pool.plan):
        files: dict[str, list[str]] = {}
        for spec in group:
            if spec.id in driver.manifest:
                files.setdefault(driver.manifest[spec.id], []).append(spec.id)
        refs.append(driver.pool.actors[i].restore.remote(list(files.items()), *(contents[name] for name in files)))
    ray.get(refs, timeout=driver.deadline("start"))  # after a recovery, new actors start first
