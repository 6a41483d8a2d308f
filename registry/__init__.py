"""The registry: Flask app on the manager that enrols nodes and generates slurm.conf."""
