"""The private local Ray of a `python -m raysim.run` / `raysim.tune` without RAY_ADDRESS.

Three guards, each because a private Ray holds the clients' data in its actors:
- token authentication is required: RAY_AUTH_MODE set to anything but `token` is refused
  (not warned about: nothing raysim runs locally needs it off, and a warning scrolls away
  while every port stays open to anyone who reaches it);
- the token file (`$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`) is made 0600: Ray writes
  it with the umask's mode (0644), readable by every local user;
- every port listens on 127.0.0.1 only: Ray turns a node address of 127.0.0.1 into the
  machine's own address unless its single-machine mode is on, so that mode is switched on for
  the start (`ray._private.ray_constants.ENABLE_RAY_CLUSTER`, read at each call); then Ray's
  servers bind to loopback instead of 0.0.0.0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import ray

from raysim.config import ConfigError

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


def check_auth_mode() -> None:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise ConfigError(
            f"RAY_AUTH_MODE={mode} would start this run's private Ray without token authentication, so anyone who reaches its ports "
            "could run code beside the clients' data; unset RAY_AUTH_MODE (or set it to token)"
        )


def token_path() -> Path | None:
    """The token file Ray reads, or None when the token comes from $RAY_AUTH_TOKEN (no file)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def private_token() -> None:
    """Ray's token file, made now with mode 0600 if missing, tightened to 0600 if others may read it."""
    path = token_path()
    if path is None:
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(0o600)
            log.warning("%s: Ray's auth token was readable by others (mode %04o); made 0600", path, mode)
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes it: 256 bits


@contextlib.contextmanager
def single_machine() -> Iterator[None]:
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def start(num_cpus: int, object_store_memory: int | None) -> None:
    """A new Ray on this machine only (`address="local"`), with the guards above."""
    check_auth_mode()
    private_token()
    with single_machine():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            configure_logging=False,
            object_store_memory=object_store_memory,
            _node_ip_address=LOOPBACK,
        )
