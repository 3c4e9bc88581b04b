"""What a sweep's trial takes of the machine: the driver schedules by these and the estimate counts with them."""


TRIAL_CPU = 0.25  # the trial's own process mostly waits on its Train run
LOCAL_MAX_TRIALS = 4  # concurrent trials on a local instance; each holds ~1-2 GB in a dozen processes
SWEEP_THREADS = 1  # torch threads per Train worker of a trial unless the grid says (train.threads_per_worker)


def auto_concurrency(*, use_gpu: bool, devices: float, workers: int, local: bool, per_worker: float = 1.0) -> int:
    """Trials a sweep runs at once unless told (``--max-concurrent``), out of ``devices``: a GPU grid, one trial
    per ``workers`` GPUs; on this machine's own instance, one trial per core (``devices`` = cores; at most
    LOCAL_MAX_TRIALS): training is CPU work, so more trials than cores only share the cores; on a cluster, as many
    as three quarters of its CPUs hold at ``per_worker`` CPUs per Train worker (the rest is Ray Data's)."""
    if use_gpu:
        return max(1, int(devices) // workers)
    if local:
        return max(1, min(int(devices), LOCAL_MAX_TRIALS))
    return max(1, int((devices * 0.75) // (workers * per_worker + TRIAL_CPU)))

