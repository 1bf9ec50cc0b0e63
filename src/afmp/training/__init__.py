"""The training loop and what a run needs: settings (config), the checks before anything is
written (prepare), the run's parts (build), its steps (run), one epoch (epoch), the run
directory and its checkpoints (rundir, checkpoint), losses, EMA, batch sizing and
DistributedDataParallel. Start at ``afmp.training.train.train``."""
