"""Hyper-parameter sweeps (Ray Tune function trainable -> one TorchTrainer per trial, ASHA)."""

from pipeline.tune.sweep import SweepResult, concurrent_trials, run_sweep, trial_cpus

__all__ = ["SweepResult", "concurrent_trials", "run_sweep", "trial_cpus"]
