"""What a sweep's trials take of the cluster, and when that leaves the reads that feed them no room."""

import pytest

from pipelines.placement import read_room_cap, read_room_problem


@pytest.mark.parametrize("nodes, unit, units", [
    ([2, 2], 1.5, 1),  # the second node keeps its 2 CPUs
    ([3, 3], 2.0, 2),  # one trial a node, a CPU each left (the node-loss test's cluster)
    ([3], 2.0, 2),  # the second trial cannot start: the one running leaves a CPU
    ([8], 1.0, 4),
    ([2, 2, 1], 1.5, 2),  # the 1-CPU node holds no trial and plans the reads
])
def test_placements_that_leave_some_node_a_whole_cpu_are_no_problem(nodes, unit, units):
    assert read_room_problem(nodes, unit, units) is None


@pytest.mark.parametrize("nodes, unit, units, placed", [
    ([2, 2], 1.5, 2, 2),  # a trial a node, half a CPU left on each: nothing reached training in 150 s
    ([4], 1.0, 4, 4),
    ([2, 2], 1.0, 6, 4),  # more wanted than fit: the four that fit leave nothing
])
def test_placements_that_leave_no_node_a_whole_cpu_are_named_with_the_node_sizes_and_what_to_change(
        nodes, unit, units, placed):
    problem = read_room_problem(nodes, unit, units)
    assert problem.startswith(f"{placed} placement(s) of {unit:g} CPU at once leave no node (CPUs per node: ")
    assert "tasks of 1 CPU" in problem and "lower train.cpus_per_worker or --max-concurrent, or add a node" in problem


def test_the_trials_at_once_are_capped_so_that_a_node_keeps_a_cpu_and_left_alone_where_even_one_would_not():
    assert read_room_cap([3, 3], 1.5, 1, 4) == 3  # four fill both nodes; three leave one CPU and a half on one
    assert read_room_cap([2, 2], 1.0, 2, 2) == 1  # Train workers: two per trial
    assert read_room_cap([8], 1.0, 1, 4) == 4
    assert read_room_cap([1.5], 1.5, 1, 2) == 2  # even one leaves nothing: not capped, the header warns
    assert read_room_cap([4], 0.2, 1, 15) == 15  # counted as Ray counts: 3 CPUs hold fifteen of 0.2
    assert read_room_problem([1.2], 0.1, 2) is None
