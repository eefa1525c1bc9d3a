"""Hyper-parameter sweeps (Ray Tune function trainable -> one TorchTrainer per trial, ASHA on the
validation k-NN; the test split reported once for the best trial)."""

from pipeline.tune.space import concurrent_trials, param_space, trial_cpus
from pipeline.tune.sweep import SweepResult, report_test_once, run_sweep

__all__ = [
    "SweepResult",
    "concurrent_trials",
    "param_space",
    "report_test_once",
    "run_sweep",
    "trial_cpus",
]
