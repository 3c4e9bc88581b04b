"""The code's shape: each concept has one home, and no function grows past what a reader holds at once."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_WORKER_LOOP_LINES = 40


def _functions(folder: str):
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(REPO), node


@pytest.mark.parametrize("folder", ["pipelines", "sweeps"])
def test_no_function_is_longer_than_sixty_lines(folder):
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions(folder) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def test_worker_loops_are_thin_and_share_one_step_loop_and_checkpointer():
    loops = {node.name: node for _, node in _functions("pipelines") if node.name.endswith("_loop")}
    assert set(loops) == {"pretrain_loop", "finetune_loop"}
    for name, node in loops.items():
        assert node.end_lineno - node.lineno + 1 <= MAX_WORKER_LOOP_LINES, name
        calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
        assert {"worker.Checkpointer", "checkpointer.restore", "worker.run_steps"} <= calls, (name, calls)


def test_platform_folder_is_configuration_not_a_package_shadowing_the_stdlib():
    assert not list((REPO / "platform").rglob("__init__.py"))
