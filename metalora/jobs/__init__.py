"""Work that runs in parallel, through submitit: the training runs, evaluation shards and report of a plan
(`metalora submit`), and the points of a sweep (`metalora sweep`), on a SLURM cluster, as child processes of this
machine, or in this process. The run directories are the state: every job may start any number of times and
continues from what they hold.
"""
