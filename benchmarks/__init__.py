"""nbflash benchmarks: ``python -m benchmarks <what>`` from the repository root."""
