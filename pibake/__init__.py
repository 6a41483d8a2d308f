"""pibake: turn a handful of Raspberry Pis into a working Slurm cluster, and prove it works."""

__version__ = "0.1.0"
