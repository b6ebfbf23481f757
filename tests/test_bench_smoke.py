"""bench/run_gpu_suite.sh's commands still work on CPU: every bench it calls accepts the flags it
passes, every pytest selection it makes selects tests, and the suite's new variants run at CPU size.
A GPU session then runs the suite without debugging it (docs/PERFORMANCE.md)."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
SUITE = os.path.join(ROOT, "bench", "run_gpu_suite.sh")
PARTS = "tests compile layers e2e memory recompute scale fp8 fp8-e2e fp8-converge offload generate attention pp".split()


def _sh(*argv, env=None, timeout=120):
    return subprocess.run(argv, env=env or ENV, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _corpus(prefix: str) -> str:
    """A small .bin/.idx corpus (the parts that take DATA check that it exists)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    for _ in range(1200):    # 2.5M tokens: the 0.1% test share of the default --split gets a sequence of 2048
        doc = torch.randint(0, 1000, (2100,), generator=g)
        builder.add_document(doc, [doc.numel()])
    builder.finalize(prefix + ".idx")
    return prefix


def suite_commands(data: str = "corpus_text_document") -> list[list[str]]:
    """Every command of every part at N = 1, 2 and 4, as SUITE_PRINT lists them (DATA set: all of them)."""
    cmds = []
    for n in (1, 2, 4):
        for part in PARTS:
            r = _sh("bash", SUITE, part, "OUT", env=dict(ENV, SUITE_PRINT="1", NGPUS=str(n), DATA=data))
            assert r.returncode == 0, r.stderr
            cmds += [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("$ ")]
    unique = []
    for c in cmds:
        if c not in unique:
            unique.append(c)
    return unique


def test_suite_script_parses_and_refuses_unknown_parts(tmp_path):
    assert _sh("bash", "-n", SUITE).returncode == 0
    for argv in (["nope", str(tmp_path / "o")], ["lease1", str(tmp_path / "o"), "fp8", "nope"]):
        r = _sh("bash", SUITE, *argv, env=dict(ENV, NGPUS="1"))
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "nope" in err[0], r.stderr
    assert not (tmp_path / "o").exists()
    r = _sh("bash", SUITE, "pp", "OUT", env=dict(ENV, SUITE_PRINT="1", NGPUS="1"))
    assert r.returncode == 0 and r.stdout.startswith("skipped: pp needs >= 2 GPUs"), r.stdout


# Replaces argparse's parse so that a bench stops right after parsing its flags: exit 0 if they
# parse, argparse's exit 2 and message if not. train_throughput.py hands its unknown flags to
# pretrain_gpt_moe.py: those are checked there, by the entry point's --dry-run at that world size.
CHECKER = r'''
import argparse, contextlib, io, json, os, runpy, sys
from megatron_ted.launch.pretrain import main
class Parsed(Exception):
    pass
real = argparse.ArgumentParser.parse_known_args
def parse_known_args(self, args=None, namespace=None):
    ns, extra = real(self, args, namespace)
    raise Parsed(ns, extra)
argparse.ArgumentParser.parse_known_args = parse_known_args
failures = []
for script, argv, nproc in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        failures.append(f"{script} {argv}: did not parse its flags")
    except Parsed as p:
        ns, extra = p.args
        if script.endswith("train_throughput.py"):
            sys.argv = [sys.argv[0]]
            import train_throughput as tt
            pre = [*tt.PRESETS[ns.preset].split(), *tt.COMMON.split(), "--tensor-model-parallel-size", str(ns.tp),
                   "--expert-model-parallel-size", str(ns.ep), "--train-iters", str(ns.iters), *extra]
            if ns.fp8_format:
                pre += ["--fp8-format", ns.fp8_format, "--fp8-recipe", ns.fp8_recipe]
            extra = []
            script, argv = "pretrain_gpt_moe.py", pre + ([] if "--data-path" in pre else ["--mock-data"])
        elif script.endswith("pretrain_gpt_moe.py"):
            extra = []
        else:
            continue
        if extra:
            failures.append(f"{script}: unknown {extra}")
            continue
        err = io.StringIO()   # the entry point's --dry-run in this process: no start-up per command
        argparse.ArgumentParser.parse_known_args = real
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main([*argv, "--dry-run", "--world-size", str(nproc)])
        argparse.ArgumentParser.parse_known_args = parse_known_args
        if code != 0:
            failures.append(f"pretrain_gpt_moe.py {' '.join(argv)[:120]}...: {err.getvalue().strip()[-300:]}")
    except SystemExit as e:
        failures.append(f"{script} {argv}: exit {e.code}")
print(json.dumps(failures))
'''


def _bench_call(cmd):
    """(script, its argv, processes) of a bench or entry-point command; None for pytest and others."""
    nproc = 1
    if cmd[0] == "torchrun":
        nproc, cmd = int(cmd[cmd.index("--nproc_per_node") + 1]), cmd[cmd.index("--nproc_per_node") + 2:]
    elif cmd[0] == "python3" and cmd[1].endswith(".py"):
        cmd = cmd[1:]
    else:
        return None
    if "--nproc" in cmd:
        nproc = int(cmd[cmd.index("--nproc") + 1])
    return cmd[0], cmd[1:], nproc


def test_every_bench_accepts_the_flags_the_suite_passes(tmp_path):
    """A renamed bench flag, or a pretrain flag that train_throughput.py passes on, fails here.
    moe_layer's and memory_model's flags need only parse; the entry point's flags also validate
    (--dry-run at the command's world size, no processes)."""
    import json
    data = _corpus(str(tmp_path / "corpus_text_document"))
    calls = [c for c in map(_bench_call, suite_commands(data)) if c is not None]
    scripts = {c[0] for c in calls}
    assert {"bench/moe_layer.py", "bench/train_throughput.py", "bench/generate.py", "bench/optimizer_offload.py",
            "bench/kernel_table.py", "pretrain_gpt_moe.py"} <= scripts, scripts
    calls = [c for c in calls if c[0] != "bench/kernel_table.py"]   # its one argument is a path the run writes
    r = _sh(sys.executable, "-c", CHECKER, json.dumps(calls), env=dict(ENV, PYTHONPATH=ROOT + os.pathsep +
                                                                        os.path.join(ROOT, "bench")), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    assert failures == [], "\n".join(failures)


def test_every_pytest_selection_of_the_suite_selects_tests():
    """A renamed GPU test (-k fp8, -k gpu, -m gpu) would otherwise make a part silently run nothing."""
    selections = [c[3:c.index("-q")] for c in suite_commands() if c[:3] == ["python3", "-m", "pytest"]]
    assert len(selections) >= 6, selections
    script = ("import sys, pytest\nbad = [s for s in %r if pytest.main([*s, '--collect-only', '-q', "
              "'-p', 'no:cacheprovider']) != 0]\nprint('EMPTY', bad)" % (selections,))
    r = _sh(sys.executable, "-c", script, timeout=300)
    assert "EMPTY []" in r.stdout, r.stdout[-3000:]


def _cpu_variant(cmd):
    """A suite moe_layer command at CPU size: the tiny shape, two iterations, no graphs or profile."""
    script, argv, _ = _bench_call(cmd)
    out, skip = [], 0
    for i, a in enumerate(argv):
        if skip:
            skip -= 1
        elif a in ("--shape", "--repeat", "--profile"):
            skip = 1
        elif a == "--cuda-graph-scope":
            skip = len(list(filter(lambda x: not x.startswith("--"), argv[i + 1:i + 3])))
        else:
            out.append(a)
    return [script, "--shape", "tiny", "--seq", "64", "--iters", "2", "--warmup", "1", *out]


def test_the_suites_new_layer_variants_and_pipeline_run_at_cpu_size():
    """Each distinct moe_layer feature the suite uses (FP8 recipes, RoPE, GQA, MLA with and without
    q's low rank) runs at the tiny shape and prints its result line with what it ran; the pp part's
    end-to-end command runs at the tiny preset (its result line parsed from a pipelined log)."""
    variants, features = [], set()
    for cmd in suite_commands():
        call = _bench_call(cmd)
        if call and call[0] == "bench/moe_layer.py" and call[2] == 1:
            v = _cpu_variant(cmd)
            key = tuple(a for a in v if a.startswith("--") and a != "--ep") + tuple(   # one run per feature set
                v[v.index(f) + 1] for f in ("--fp8-recipe",) if f in v)
            if key not in features:
                features.add(key)
                variants.append(v)
    assert len(variants) >= 6, variants
    for v in variants:
        r = _sh(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *v, timeout=120)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("moe_layer shape=tiny")]
        assert r.returncode == 0 and line, (v, r.stderr[-1500:])
        if "--fp8-format" in v:
            assert f"fp8=hybrid/{v[v.index('--fp8-recipe') + 1]}" in line[0], line
        if "--multi-latent-attention" in v:
            assert "attn=mla512/q" in line[0] and "+rope" in line[0], line
        elif "--num-query-groups" in v:
            assert f"attn=gqa{v[v.index('--num-query-groups') + 1]}+rope" in line[0], line
    r = _sh(sys.executable, "bench/train_throughput.py", "--preset", "tiny", "--nproc", "2", "--iters", "4",
            "--warmup", "1", "--global-batch-size", "4", "--pipeline-model-parallel-size", "2", timeout=300)
    assert r.returncode == 0 and re.search(r"train_throughput preset=tiny nproc=2 .*\| [\d.]+ ms/iter", r.stdout), \
        r.stdout[-1500:] + r.stderr[-1500:]
