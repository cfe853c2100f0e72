"""Benchmarks: each sub-command prints a table and saves its figures as JSON."""
