"""Kernel factories: each ``build_*`` function compiles one kernel per configuration."""
