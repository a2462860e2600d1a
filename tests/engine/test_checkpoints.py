"""The checkpoint format without Ray: manifest, verification and fallback, safe loading, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raysim.engine import checkpoints
from raysim.engine.checkpoints import CheckpointError


def write(run_dir: Path, round_: int, clients: dict[str, dict], previous: dict | None = None, keep: int = 2) -> dict:
    """A checkpoint as the driver writes it: server.pt, one actor file, the manifest, COMPLETE."""
    folder = checkpoints.folder(run_dir, round_)
    checkpoints.write_server(folder, round_, {"weights": {"w": torch.full((3,), float(round_))}, "stepped": ["w"], "fair_weights": {"a": 1.5}})
    mapping = dict(previous["clients"]) if previous else {}
    if clients:
        path = checkpoints.actor_file(folder, 0)
        checkpoints.save_atomic(clients, path)
        mapping.update({cid: checkpoints.relative(path) for cid in clients})
    known = previous["files"] if previous else {}
    files = checkpoints.complete(folder, round_, mapping, {}, known, keep)
    return {"clients": mapping, "files": files}


def state(value: float) -> dict:
    return {"own_state": {"bn": torch.tensor([value])}, "memory": {"stats": [value, 2.0]}}


def test_manifest_names_every_file_with_size_and_sha256_and_files_load_weights_only(tmp_path: Path) -> None:
    first = write(tmp_path, 1, {"a": state(1.0), "b": state(2.0)})
    second = write(tmp_path, 2, {"a": state(3.0)}, first)
    folder, skipped = checkpoints.usable(tmp_path)
    assert folder.name == "round_0002" and skipped == []
    manifest = checkpoints.load_manifest(folder)
    assert manifest["format"] == checkpoints.FORMAT
    assert manifest["clients"] == {"a": "round_0002/clients/actor_000.pt", "b": "round_0001/clients/actor_000.pt"}
    assert set(manifest["files"]) == {"round_0002/server.pt", "round_0002/clients/actor_000.pt", "round_0001/clients/actor_000.pt"}
    assert manifest["files"] == second["files"]
    for name, described in manifest["files"].items():
        assert described == checkpoints.describe(tmp_path / "checkpoints" / name)
    server, done = checkpoints.load_server(folder)
    assert done == 2 and server["fair_weights"] == {"a": 1.5} and torch.equal(server["weights"]["w"], torch.full((3,), 2.0))
    assert checkpoints.load(tmp_path / "checkpoints" / manifest["clients"]["b"])["b"]["memory"]["stats"] == [2.0, 2.0]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    first = write(tmp_path, 1, {"a": state(1.0)})
    write(tmp_path, 2, {"a": state(2.0)}, first)
    server = tmp_path / "checkpoints" / "round_0002" / "server.pt"
    server.write_bytes(server.read_bytes()[:-10])  # truncated
    folder, skipped = checkpoints.usable(tmp_path)
    assert folder.name == "round_0001"
    size = server.stat().st_size
    assert skipped == [f"checkpoint round_0002 is unusable (round_0002/server.pt has {size} bytes, the manifest says {size + 10}); using the previous one"]
    (tmp_path / "checkpoints" / "round_0001" / "clients" / "actor_000.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        checkpoints.usable(tmp_path)


def test_code_in_a_checkpoint_file_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # what a malicious file would run on unpickling
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state": Payload()}, path)
    with pytest.raises(CheckpointError, match="tensors and plain values only"):
        checkpoints.load(path)


def test_old_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    old = tmp_path / "checkpoints" / "round_0003"
    (old / "clients").mkdir(parents=True)
    torch.save({"round": 3, "state": {}}, old / "server.pt")
    (old / "COMPLETE").write_text("3\n")
    with pytest.raises(CheckpointError, match=r"written by raysim 0.2.0 or earlier \(no MANIFEST.json\).*start the run again"):
        checkpoints.usable(tmp_path)
    (old / "MANIFEST.json").write_text(json.dumps({"format": 1, "files": {}}))
    with pytest.raises(CheckpointError, match="checkpoint format 1, this version reads format 2"):
        checkpoints.usable(tmp_path)


def test_pruning_keeps_the_newest_complete_checkpoints_and_what_they_name(tmp_path: Path) -> None:
    one = write(tmp_path, 1, {"a": state(1.0), "b": state(1.0)}, keep=2)
    two = write(tmp_path, 2, {"a": state(2.0)}, one, keep=2)
    write(tmp_path, 3, {"a": state(3.0)}, two, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["round_0001", "round_0002", "round_0003"]
    # round 1 is no longer a checkpoint, but b's state lives there: only that file stays
    assert sorted(checkpoints.relative(p) for p in (root / "round_0001").rglob("*") if p.is_file()) == ["round_0001/clients/actor_000.pt"]
    assert (root / "round_0002" / "COMPLETE").exists() and (root / "round_0003" / "COMPLETE").exists()
    assert checkpoints.verify(root / "round_0002") is None and checkpoints.verify(root / "round_0003") is None


def test_an_actor_streams_its_clients_states_and_never_gets_a_path(oph_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The actor's body: ids first, then one torch.save file in chunks the driver writes
    (`write_chunks`: size and sha256 as `describe` reads them); the clients stay marked changed
    until `saved`; `restore` takes the file's bytes and gives the same states back."""
    from raysim.datasets import DATASETS
    from raysim.engine import client_actor
    from raysim.engine.client_actor import ClientHost

    from helpers import load_config, tiny_overrides

    monkeypatch.setattr(client_actor, "CHUNK_BYTES", 1000)  # several pieces even for test_resnet's BN state
    cfg = load_config(None, tiny_overrides(oph_root, **{"algorithm.name": "fedbn", "resources.clients_per_actor": 2}))
    host = ClientHost(cfg, DATASETS.get("fairfedmed_oph")(cfg.data, img_size=16, seed=0).client_specs()[:2])
    state = host.algorithm.init_state(host.clients["site1"].model)
    host.fit("site1", host.algorithm.payload(state, 1), 1)
    stream = host.save_changed()
    assert next(stream) == ["site1"]
    chunks = list(stream)
    assert len(chunks) > 1 and all(len(c) <= 1000 for c in chunks)
    path = tmp_path / "actor_000.pt"
    assert checkpoints.write_chunks(iter(chunks), path) == checkpoints.describe(path)
    assert not path.with_name("actor_000.pt.tmp").exists()
    assert next(host.save_changed()) == ["site1"]  # not confirmed yet: still changed
    host.saved(["site1"])
    assert list(host.save_changed()) == [[]]

    before = {k: v.clone() for k, v in host.clients["site1"].state()["own_state"].items()}
    host.fit("site1", host.algorithm.payload(state, 2), 2)
    assert any(not torch.equal(before[k], v) for k, v in host.clients["site1"].state()["own_state"].items())
    host.restore([("round_0001/clients/actor_000.pt", ["site1"])], path.read_bytes())
    after = host.clients["site1"].state()["own_state"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert list(host.save_changed()) == [[]]
    with pytest.raises(CheckpointError, match="round_0001/clients/actor_000.pt: not a raysim checkpoint"):
        host.restore([("round_0001/clients/actor_000.pt", ["site1"])], b"not a torch file")


def test_the_server_file_is_hashed_while_written_not_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29, item 5: reading a 45 MB server state back for its sha256 cost every round 70 ms."""
    folder = checkpoints.folder(tmp_path, 1)
    state_ = {"weights": {"w": torch.arange(100_000, dtype=torch.float32)}}
    described = checkpoints.write_server(folder, 1, state_)
    assert described == checkpoints.describe(folder / checkpoints.SERVER)  # size and sha256 of the bytes on disk
    assert torch.equal(checkpoints.load_server(folder)[0]["weights"]["w"], state_["weights"]["w"])
    monkeypatch.setattr(checkpoints, "sha256", lambda path: pytest.fail(f"{path} read back for its hash"))
    files = checkpoints.complete(folder, 1, {}, {}, {checkpoints.relative(folder / checkpoints.SERVER): described}, keep=2)
    assert files[checkpoints.relative(folder / checkpoints.SERVER)] == described
