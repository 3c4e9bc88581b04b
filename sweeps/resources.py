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


READ_PLANNING_CPUS = 1.0  # Ray Data's Parquet reader plans a read by sampling files in tasks of one CPU each


def read_room_problem(node_cpus: list[float], unit: float, units: int) -> str | None:
    """Why ``units`` placements of ``unit`` CPUs each (the trials, each in its own process, or their Train
    workers) on nodes of ``node_cpus`` CPUs would wait for good, or None: however they are placed, no node keeps
    READ_PLANNING_CPUS free for the reads that feed them (2-CPU nodes and trials of 1.5 CPUs, say). Nodes that
    may still join the cluster are not counted: on an autoscaling cluster this warns, it does not refuse."""
    fits = [int(n // unit) for n in node_cpus]
    placed = min(units, sum(fits))
    if not placed:
        return None  # nothing fits at all: Tune's pending trials say so (the `waiting` line)
    for n, fit in zip(node_cpus, fits, strict=True):  # can node n keep a CPU free while the others take the rest?
        if n >= READ_PLANNING_CPUS and sum(fits) - fit + int((n - READ_PLANNING_CPUS) // unit) >= placed:
            return None
    sizes = ", ".join(f"{n:g}" for n in sorted(set(node_cpus)))
    return (f"{placed} placement(s) of {unit:g} CPU at once leave no node (CPUs per node: {sizes}) a whole CPU "
            f"free, and Ray Data plans every read with tasks of {READ_PLANNING_CPUS:g} CPU: the trials would wait "
            f"for good; lower train.cpus_per_worker or --max-concurrent, or add a node")


def read_room_cap(node_cpus: list[float], unit: float, per_trial: int, wanted: int) -> int:
    """The most trials at once, up to ``wanted``, each ``per_trial`` placements of ``unit`` CPUs, that leave some
    node a whole CPU for the reads (``read_room_problem``); ``wanted`` where even one would not (a warning then)."""
    for trials in range(wanted, 0, -1):
        if read_room_problem(node_cpus, unit, trials * per_trial) is None:
            return trials
    return wanted
