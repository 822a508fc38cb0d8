"""Experiments: presets, reproduce, sweeps and the benchmark."""
