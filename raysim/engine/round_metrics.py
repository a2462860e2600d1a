"""What a round adds to the run's metrics: its evaluation (which clients are scored, their
predictions turned into the metric frame with the participants' means, the console table) and
its training rows (bytes down / up, the local loss, the method's server metrics, the clients
out of the run).

Apart from the driver's round loop (`driver`) because it changes with what is measured and
recorded (`metrics`, `outputs.recorder`, `cfg.eval`), not with how the rounds run.
"""

from __future__ import annotations

import logging
import warnings

import pandas as pd

from raysim import console
from raysim.algorithms import ServerState
from raysim.algorithms.base import HOLDOUT
from raysim.config import ConfigError, ExperimentConfig
from raysim.datasets import ClientSpec, DataSource
from raysim.engine.failures import RunFailed, mark_failed
from raysim.engine.run_state import RoundOutcome, RunState
from raysim.metrics.classification import UndefinedMetricWarning
from raysim.outputs import recorder
from raysim.seeding import derive_seed, rng
from raysim.types import Predictions

log = logging.getLogger("raysim.engine.driver")  # the round's warnings keep the driver's logger name


def evaluate(driver: RunState, round_: int, state: ServerState, *, splits: list[str], show: str) -> None:
    """The global model of `state` scored on the chosen clients (and the held-out site) on
    `splits`; the metric frame recorded and the `show` split's table echoed."""
    chosen = [cid for cid in eval_clients(driver) if cid not in driver.dead]
    if driver.holdout and driver.holdout.id not in driver.dead:  # scored at every evaluation, whatever eval.clients says
        chosen.append(driver.holdout.id)
    driver.pool.broadcast(driver.algorithm.payload(state, round_), chosen, driver.algorithm.round_values(state, round_))
    predictions: list[Predictions] = []
    phase = f"round {round_}: clients evaluated"
    console.report(phase, 0, len(chosen))
    record = driver.recorder.keeps(round_)  # sample ids and masks leave the actors only for predictions.parquet
    for done, (cid, result) in enumerate(driver.pool.ordered("evaluate", chosen, None, splits, record, window=8, timeout=driver.deadline("eval")), start=1):
        console.report(phase, done, len(chosen))
        if isinstance(result, Exception):
            mark_failed(driver, cid, result)
        else:
            predictions.extend(result)
    driver.notes.flush()
    if not predictions:
        raise RunFailed(f"round {round_}: no client could be evaluated ({driver.dead})")  # e.g. every actor lost under drop: exit 1, not a traceback
    group_names = driver.source.group_names
    with warnings.catch_warnings(record=True) as undefined:
        warnings.simplefilter("always", UndefinedMetricWarning)
        scored = [(p, derive_seed(driver.cfg.seed, "boot", round_, p.client_id, p.split)) for p in predictions]
        frame = recorder.metric_frame(round_, scored, group_names, driver.attributes, n_boot=driver.cfg.eval.bootstrap)
    if undefined:
        # Small groups make undefined values routine: one line, not one warning each.
        log.warning("round %d: %d metric values undefined (NaN), e.g. %s", round_, len(undefined), undefined[0].message)
    metric_frame = with_means(frame)
    driver.evaluated_round = round_
    driver.recorder.add(metric_frame, driver.recorder.prediction_frames(round_, predictions, driver.attributes))  # eval.predictions, eval.pseudonymize
    attribute = driver.target_attribute
    driver.echo(recorder.format_table(metric_frame, round_=round_, split=show, attribute=attribute, group_names=group_names.get(attribute, {}), task=driver.algorithm.task.name))
    if dropped := dropped_clients(driver.dead, driver.specs):
        driver.echo(f"means over {len(driver.specs) - len(dropped)} of {len(driver.specs)} clients; dropped: {console.first(dropped)}")


def with_means(frame: pd.DataFrame) -> pd.DataFrame:
    """`recorder.with_means` over the participants' rows; the held-out site's rows (role
    `holdout`) follow as they are, in no mean (so selection by mean validation metric is the
    participants' alone). Without a held-out site: exactly `with_means(frame)`."""
    held = frame["role"] == HOLDOUT
    if not held.any():
        return recorder.with_means(frame)
    return pd.concat([recorder.with_means(frame[~held]), frame[held]], ignore_index=True)


def dropped_clients(dead: dict[str, str], specs: dict[str, ClientSpec]) -> list[str]:
    """Participants out of the run (`fault.on_client_loss=drop`); a lost held-out site is no missing client."""
    return sorted(cid for cid in dead if cid in specs)


def eval_clients(driver: RunState) -> list[str]:
    """`eval.clients`: all clients, the last round's cohort, or a seeded subset fixed for the run."""
    everyone = sorted(driver.specs)
    chosen = driver.cfg.eval.clients
    if chosen == "all":
        return everyone
    if chosen == "sampled":
        return getattr(driver, "last_sampled", None) or everyone
    picked = rng(driver.cfg.seed, "eval_clients").choice(len(everyone), size=min(int(chosen), len(everyone)), replace=False)
    return [everyone[i] for i in sorted(picked)]


def eval_attributes(cfg: ExperimentConfig, source: DataSource) -> list[str]:
    """The attributes every evaluation groups by (`eval.attributes`, else all the source has)."""
    available = list(source.group_names)
    if not available:  # e.g. MedMNIST: no demographics, accuracy metrics only
        return []
    chosen = cfg.eval.attributes or available
    unknown = [a for a in chosen if a not in available]
    if unknown:
        raise ConfigError(f"eval.attributes {unknown} not in data source {cfg.data.name}; choose from {', '.join(available)}")
    if source.attribute not in available:
        raise ConfigError(f"data.attribute {source.attribute!r} not in data source {cfg.data.name}; choose from {', '.join(available)}")
    return list(chosen)


def record_traffic(driver: RunState, round_: int, down: int, outcome: RoundOutcome) -> None:
    """bytes_down / bytes_up / the training loss per client that took part (split `train`), and their means."""
    rows = [(a.client_id, "bytes_down", float(down)) for a in outcome.arrived]
    rows += [(a.client_id, "bytes_up", float(a.nbytes)) for a in outcome.arrived]
    rows += [(a.client_id, "loss", float(a.loss)) for a in outcome.arrived]  # the local training loss
    if not rows:
        return
    frame = pd.DataFrame(rows, columns=["client", "metric", "value"])
    roles = {cid: spec.role for cid, spec in driver.specs.items()}
    frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles), attribute="", group="")
    driver.recorder.add(recorder.with_means(frame[recorder.METRIC_COLUMNS]), [])
    driver.traffic_down += down * len(outcome.arrived)
    driver.traffic_up += sum(a.nbytes for a in outcome.arrived)


def record_server_metrics(driver: RunState, round_: int, state: ServerState) -> None:
    """The method's `server_metrics` as rows of client `server`, split `train`, outside the means."""
    values = driver.algorithm.server_metrics(round_, state)
    if values:
        frame = pd.DataFrame({"round": round_, "split": "train", "client": recorder.SERVER, "role": "", "attribute": "", "group": "", "metric": list(values), "value": [float(v) for v in values.values()]})
        driver.recorder.add(frame[recorder.METRIC_COLUMNS], [])


def record_missing(driver: RunState, round_: int) -> None:
    """With clients dropped (fault.on_client_loss=drop): `missing` (1.0) per dropped client and
    `n_clients` (those left, over which every mean is taken), split `train`, every round."""
    dropped = dropped_clients(driver.dead, driver.specs)
    if not dropped:
        return
    rows = [(cid, "missing", 1.0) for cid in dropped] + [("mean", "n_clients", float(len(driver.specs) - len(dropped)))]
    frame = pd.DataFrame(rows, columns=["client", "metric", "value"])
    roles = {cid: spec.role for cid, spec in driver.specs.items()}
    frame = frame.assign(round=round_, split="train", role=frame["client"].map(roles).fillna(""), attribute="", group="")
    driver.recorder.add(frame[recorder.METRIC_COLUMNS], [])
