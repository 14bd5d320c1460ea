"""SLURM launcher that gives up on jobs that can never start: ``hydra/launcher=slurm_gpu``."""
