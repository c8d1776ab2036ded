"""Cluster schedulers: Slurm detection, node addresses and job scripts."""
