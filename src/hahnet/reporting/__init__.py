"""Reports and plots of evaluations, corruptions, sweeps and benchmarks."""
