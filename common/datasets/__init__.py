"""Public datasets shipped with prefixd for the demo, tests and benchmarks."""
