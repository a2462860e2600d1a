"""Metrics, pure numpy and recomputable from predictions: `classification` (AUC, ES-AUC, EOD,
SPD, bootstrap intervals) and `segmentation` (Dice, IoU, HD95, CDR, ES-Dice).

The classification names stay importable from here (`from raysim.metrics import auc`), as in
0.6, when this package was one module.
"""

from raysim.metrics.classification import (
    FRAME_COLUMNS,
    METRIC_NAMES,
    NOT_AVERAGED,
    UndefinedMetricWarning,
    accuracy,
    auc,
    balanced_accuracy,
    bootstrap_auc_interval,
    client_metrics,
    demographic_parity_difference,
    equalized_odds_difference,
    equity_scaled,
    log_loss,
    mean_over_clients,
    predictions,
)

__all__ = [
    "FRAME_COLUMNS",
    "METRIC_NAMES",
    "NOT_AVERAGED",
    "UndefinedMetricWarning",
    "accuracy",
    "auc",
    "balanced_accuracy",
    "bootstrap_auc_interval",
    "client_metrics",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equity_scaled",
    "log_loss",
    "mean_over_clients",
    "predictions",
]
