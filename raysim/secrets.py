"""Secret keys for actors: one mechanism for every key raysim reads.

A key lives in a file on storage every node reads (an absolute path outside the run
directory, which is copied and shared: Tune checkpoints, a URI mirror), or in an
environment variable; the process that needs it (the driver actor for DP noise and the
prediction pseudonyms, a client actor for in-actor pseudonymisation) reads it itself, so the
key never travels in a config, an object-store payload, a checkpoint or a log. On a cluster,
mount the key file read-only on every node (a Kubernetes Secret volume, a file on the shared
filesystem with mode 0600); see the README's "Secrets on a cluster".

`read_key` is the only reader: `eval.id_key_file` / `$RAYSIM_ID_KEY` (pseudonyms) and
`algorithm.noise_key_file` / `$RAYSIM_NOISE_KEY` (keyed DP noise) both go through it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raysim.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from raysim.config import EvalConfig

MIN_KEY_BYTES = 16
ID_KEY_ENV = "RAYSIM_ID_KEY"
PSEUDONYM_HEX = 16  # 64 bits: a collision among a million ids has odds of about 3e-8


def read_key(
    key_file: str | None,
    env_var: str,
    *,
    file_key: str,
    enabled_by: str,
    purpose: str,
    run_dir: Path | str | None = None,
    private: bool = False,
) -> bytes:
    """The key's bytes (surrounding whitespace stripped) from `key_file`, else `$env_var`.

    `file_key` names the config key holding the path, `enabled_by` the setting that asks for
    the key and `purpose` what the key is for, in messages. A ConfigError when no usable key is found, it is shorter than MIN_KEY_BYTES, the
    file lies inside `run_dir`, or (`private`) the file is readable by group or others. The
    key itself never appears in a message."""
    if key_file is not None:
        path = Path(key_file).expanduser().resolve()
        if run_dir is not None:
            run = Path(run_dir).expanduser().resolve()
            if path == run or run in path.parents:
                raise ConfigError(f"{file_key} {path} lies in the run directory {run}, which is copied and shared; keep the key elsewhere")
        try:
            if private and stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise ConfigError(f"{file_key} {path}: the {purpose} key file is readable by others (mode {stat.S_IMODE(path.stat().st_mode):04o}); run `chmod 600 {path}`")
            key = path.read_bytes().strip()
        except OSError as err:
            raise ConfigError(f"{file_key} {path}: cannot read the {purpose} key ({err.strerror or err})") from err
        where = f"{file_key} {path}"
    else:
        key = os.environ.get(env_var, "").strip().encode()
        if not key:
            raise ConfigError(f"{enabled_by} needs a key: set ${env_var} or {file_key} (outside the run directory), e.g. from `openssl rand -hex 32`")
        where = f"${env_var}"
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{where}: the {purpose} key has {len(key)} bytes, fewer than {MIN_KEY_BYTES}; use e.g. `openssl rand -hex 32`")
    return key


def derive(key: bytes, *parts: object) -> bytes:
    """HMAC-SHA256(key, parts joined by NUL): a value only the key's holder can compute (seeds,
    pseudonyms). Parts are rendered with str()."""
    message = b"\x00".join(str(p).encode() for p in parts)
    return hmac.new(key, message, hashlib.sha256).digest()


# --- pseudonymisation -----------------------------------------------------------------------


def pseudonym(ids: Sequence[object] | np.ndarray, key: bytes) -> np.ndarray:
    """HMAC-SHA256 of each id under `key`, its first 16 hex digits: the same id gives the same
    pseudonym under one key (samples stay joinable across rounds and runs), and without the
    key neither the id nor a guess at it can be checked."""
    return np.array([hmac.new(key, str(i).encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX] for i in ids], dtype=object)


def id_key(cfg: EvalConfig, run_dir: Path | None) -> bytes | None:
    """The pseudonymisation key (`eval.pseudonymize`): the contents of `eval.id_key_file`, else
    `$RAYSIM_ID_KEY` (surrounding whitespace stripped); None when off. A ConfigError when it is on
    and no usable key is found, or the key file lies in `run_dir` (which is copied: Tune
    checkpoints, a URI mirror; the driver checks, a client actor knows no run directory). The
    client actors read it to pseudonymise ids before they leave; the key is never written anywhere."""
    if not cfg.pseudonymize:
        return None
    return read_key(cfg.id_key_file, ID_KEY_ENV, file_key="eval.id_key_file", enabled_by="eval.pseudonymize=true", purpose="pseudonymisation", run_dir=run_dir)
