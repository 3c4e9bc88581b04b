"""What a sweep's trial takes of the machine: the driver schedules by these and the estimate counts with them."""

TRIAL_CPU = 0.25  # the trial's own process mostly waits on its Train run
LOCAL_MAX_TRIALS = 4  # concurrent trials on a local instance; each holds ~1-2 GB in a dozen processes
SWEEP_THREADS = 1  # torch threads per Train worker of a trial unless the grid says (train.threads_per_worker)
