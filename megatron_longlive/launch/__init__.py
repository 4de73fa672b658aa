"""Cluster launchers: render sbatch scripts from a run config (Slurm + torchrun, or mpirun)."""
