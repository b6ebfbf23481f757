"""The packages import in one direction (issue 22): a static walk of every module's imports (ast,
lazy ones inside functions included) fails on an import of a higher layer, and on a cycle of
module-level imports."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "megatron_ted")

# The allowed order, lowest first: a package imports its own modules and those of lower layers.
# Packages of one layer are peers (they may import each other; a cycle still fails).
LAYERS = [
    {"cli"},                                  # the tools' one-line argparse
    {"parallel"},                             # the layout, groups, collectives
    {"tensor_parallel"},                      # TP layers (linears, vocab, the dense MLP, FP8)
    {"moe"},                                  # the MoE block: router, dispatch, experts
    {"model"},                                # the GPT model and its builder (uses moe)
    {"config"},                               # the typed configuration of a run
    {"parallelize"},                          # whole-model parallel transformations (SP, recompute, FP8, ...)
    {"data"},
    {"training", "pipeline"},                 # the loop, and its pipelined step (which returns a StepResult)
    {"planning", "inference", "interop"},
    {"launch"},                               # the entry points: flags -> configuration -> dry run or training
]
# Known upward imports, each with its reason (none may be added).
KNOWN_UPWARD: dict[str, str] = {}
LAYER = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                yield name, path


def _imports(path: str, top_level_only: bool, modules=()):
    """The megatron_ted modules a file imports ("from pkg import mod" names pkg.mod when it is one of
    `modules`)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_ted"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            yield from subs or [node.module]
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("megatron_ted"))


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_is_in_the_order():
    packages = {_package(m) for m, _ in _modules()} - {None}
    assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_no_upward_import():
    upward = []
    for module, path in _modules():
        src = _package(module)
        for target in _imports(path, top_level_only=False):
            dst = _package(target)
            if src and dst and dst != src and LAYER[dst] > LAYER[src] and f"{module} -> {target}" not in KNOWN_UPWARD:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(set(upward)))


def test_no_cycle_of_module_level_imports():
    graph = {m: set() for m, _ in _modules()}
    for module, path in _modules():
        for target in _imports(path, top_level_only=True, modules=graph):
            while target not in graph and "." in target:    # "from pkg.mod import name" names pkg.mod
                target = target.rsplit(".", 1)[0]
            if target in graph and target != module:
                graph[module].add(target)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_planning_imports_nothing_from_training():
    """Every module of megatron_ted.planning (the analytic models, the dry run, the planner), imported
    in one process, loads no module of megatron_ted.training."""
    planning = sorted(m for m, _ in _modules() if m == "megatron_ted.planning" or m.startswith("megatron_ted.planning."))
    assert "megatron_ted.planning.dry_run" in planning and "megatron_ted.planning.search" in planning
    code = ("import importlib, sys\n"
            f"for m in {planning!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('megatron_ted.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout.strip()
    assert out == "[]", out


# ---- the flags stay at the CLI edge (issue 22) ----------------------------------------------------
# Modules that read the argparse flags, each with its reason. Below them the code takes the typed
# configuration (megatron_ted/config/); none may be added.
CLI_EDGE = {
    "megatron_ted.cli": "the tools' one-line argparse",
    "megatron_ted.launch.pretrain": "the entry point: parse, validate, build the configuration, train",
    "megatron_ted.launch.plan": "the planner's candidates: flag sets validated by the trainer's parser",
    "megatron_ted.config.from_flags": "the flags -> the typed configuration, built once",
    "megatron_ted.training.arguments": "the parser of pretrain_gpt_moe.py and its validation",
    "megatron_ted.training.compat_flags": "Megatron-LM's and Megatron-DeepSpeed's flags, accepted or refused",
    "megatron_ted.training.deepspeed_moe": "Megatron-DeepSpeed's MoE flags and their defaults, resolved",
    "megatron_ted.training.run_length": "--train-samples and friends, resolved into iterations",
    "megatron_ted.training.checkpoint_args": "--use-checkpoint-args: a step of the parser",
    "megatron_ted.training.upcycle_flags": "the checks of the upcycling flags, run by the parser",
    "megatron_ted.pipeline.flags": "the pipeline flags, resolved into a split",
    "megatron_ted.data.preprocess": "tools/preprocess_data.py's parser and its run",
    "megatron_ted.inference.launch_flags": "a Megatron-LM serving script's pretraining flags, checked and sorted",
}


def _reads_flags(path: str) -> list[tuple[str, str]]:
    """(function, where) of each function with a parameter named `args` and each use of argparse.Namespace."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            if "args" in [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]:
                name = getattr(node, "name", "lambda")
                found.append((name, f"{name}(args) line {node.lineno}"))
        elif isinstance(node, ast.Attribute) and node.attr == "Namespace":
            found.append(("", f"Namespace line {node.lineno}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "argparse" and \
                any(a.name == "Namespace" for a in node.names):
            found.append(("", f"from argparse import Namespace line {node.lineno}"))
    return found


def test_nothing_below_the_cli_edge_reads_the_flags():
    readers = [f"{module}: {where}" for module, path in _modules() if module not in CLI_EDGE
               for _, where in _reads_flags(path)]
    assert not readers, "flags read below the CLI edge (take the typed configuration):\n" + "\n".join(readers)
