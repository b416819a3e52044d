"""Hyper-parameter search: NNI search spaces and experiment configs run as Optuna studies."""
