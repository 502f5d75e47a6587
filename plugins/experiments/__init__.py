"""Experiment reports: Hydra callbacks that read a sweep's runs back from MLflow and plot the result."""
