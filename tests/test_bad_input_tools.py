"""Bad input to the tools and the data side of the entry point, through the real command lines: one
line on stderr, no traceback, a non-zero exit, and every file that was there byte-identical after."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from megatron_ted.data.preprocess import main as preprocess_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--vocab-size", "50", "--train-iters", "1", "--split", "1,0,0",
         "--eval-iters", "0"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def run(script, *argv, cwd=None, env=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WORLD_SIZE="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def one_line_error(r, *needles, code=None):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 if code is None else r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def hashes(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under directory (what must not change)."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_jsonl(path, n_docs, key="text"):
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({key: " ".join(str((7 * i + j) % 50) for j in range(30))}) + "\n")
    return str(path)


def make_dataset(directory, name="good", n_docs=20):
    """A NullTokenizer corpus (50 ids + EOD) preprocessed in-process: `<dir>/<name>_text_document`."""
    corpus = write_jsonl(os.path.join(directory, f"{name}.jsonl"), n_docs)
    assert preprocess_main(["--input", corpus, "--tokenizer-type", "NullTokenizer", "--vocab-size", "50",
                            "--append-eod", "--output-prefix", os.path.join(directory, name)]) == 0
    return os.path.join(directory, f"{name}_text_document")


# ------------------------------------------------------------------------------------- preprocess
def test_a_failed_preprocess_keeps_the_existing_dataset(tmp_path):
    """An input error on line 1 used to delete the good .bin/.idx under the same prefix."""
    make_dataset(tmp_path)
    no_key = write_jsonl(tmp_path / "nokey.jsonl", 3, key="body")
    before = hashes(tmp_path)
    r = run("tools/preprocess_data.py", "--input", no_key, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "50", "--output-prefix", tmp_path / "good")
    one_line_error(r, "line 1", "no key 'text'")
    assert hashes(tmp_path) == before        # the old dataset as it was, no temporaries left
    # a run that succeeds replaces it (and leaves only the two outputs)
    other = write_jsonl(tmp_path / "other.jsonl", 5)
    r = run("tools/preprocess_data.py", "--input", other, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "50", "--output-prefix", tmp_path / "good")
    assert r.returncode == 0, r.stderr
    after = hashes(tmp_path)
    assert set(after) == set(before) | {"other.jsonl"}
    assert after["good_text_document.idx"] != before["good_text_document.idx"]


@pytest.mark.parametrize("case", ["under_a_file", pytest.param("read_only_dir", marks=pytest.mark.skipif(
    IS_ROOT, reason="root writes into a read-only directory"))])
def test_an_unusable_output_prefix_is_one_line(tmp_path, case):
    corpus = write_jsonl(tmp_path / "c.jsonl", 3)
    if case == "under_a_file":
        (tmp_path / "somefile.txt").write_text("mine\n")
        prefix = tmp_path / "somefile.txt" / "out"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        prefix = tmp_path / "ro" / "out"
    before = hashes(tmp_path)
    r = run("tools/preprocess_data.py", "--input", corpus, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "50", "--output-prefix", prefix)
    one_line_error(r, "--output-prefix")
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------------------- damaged data files
def test_damaged_data_files_are_one_line_naming_the_file(tmp_path):
    """A truncated .bin, a truncated .idx, a wrong .idx header and an empty corpus: one line naming
    the damaged file and what is wrong, before training (megatron-core raised deep inside)."""
    good = make_dataset(tmp_path)
    with open(good + ".bin", "rb") as f:
        data_bin = f.read()
    with open(good + ".idx", "rb") as f:
        data_idx = f.read()
    cases = {
        "short_bin": (data_bin[:100], data_idx, ".bin", "truncated"),
        "short_idx": (data_bin, data_idx[:50], ".idx", "truncated"),
        "bad_magic": (data_bin, b"NOTANIDX\x00" + data_idx[9:], ".idx", "not a Megatron index"),
    }
    for name, (b, i, ext, what) in cases.items():
        for suffix, content in ((".bin", b), (".idx", i)):
            (tmp_path / (name + suffix)).write_bytes(content)
    open(tmp_path / "empty.jsonl", "w").close()
    assert preprocess_main(["--input", str(tmp_path / "empty.jsonl"), "--tokenizer-type", "NullTokenizer",
                            "--vocab-size", "50", "--output-prefix", str(tmp_path / "empty")]) == 0
    cases["empty_text_document"] = (None, None, ".idx", "no sequences")
    before = hashes(tmp_path)
    for name, (_, _, ext, what) in cases.items():
        prefix = str(tmp_path / name)
        r = run("pretrain_gpt_moe.py", *ENTRY, "--data-path", prefix, cwd=tmp_path)
        line = one_line_error(r, prefix + ext, what, "--data-path", code=2)
        assert "iteration" not in r.stdout, line   # before training
    assert hashes(tmp_path) == before


def test_data_found_bad_is_reported_before_the_process_group(tmp_path):
    """A split without tokens and a --data-cache-path others can write are start-up checks: they come
    out before the rendezvous, here shown by a MASTER_PORT that is taken (whose line they beat)."""
    import socket

    (tmp_path / "data").mkdir()
    prefix = make_dataset(tmp_path / "data", n_docs=3)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    before = hashes(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"MASTER_PORT": str(taken.getsockname()[1])}
        r = run("pretrain_gpt_moe.py", *ENTRY[:-4], "--split", "969,30,1", "--eval-iters", "1",
                "--data-path", prefix, cwd=tmp_path, env=env)
        one_line_error(r, "--split 969,30,1: the valid split of", "gets no tokens", code=2)
        r = run("pretrain_gpt_moe.py", *ENTRY, "--data-path", prefix, "--data-cache-path", shared,
                cwd=tmp_path, env=env)
        one_line_error(r, "--data-cache-path", "writable by group or others", code=2)
        r = run("pretrain_gpt_moe.py", *ENTRY, "--mock-data", "--data-cache-path", tmp_path / "data" /
                "good.jsonl" / "cache", cwd=tmp_path, env=env)
        one_line_error(r, "--data-cache-path", "cannot create it", code=2)
    assert hashes(tmp_path) == before and os.listdir(shared) == []


# ------------------------------------------------------------------------------- the index cache
def test_a_cache_directory_others_can_write_is_refused(tmp_path):
    """megatron-core unpickles its index cache: a --data-cache-path writable by group or others
    (where anyone could plant a file) stops the run with one line; the planted file stays as it was."""
    (tmp_path / "data").mkdir()
    prefix = make_dataset(tmp_path / "data")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "planted.npy").write_bytes(b"\x93NUMPY pretend pickle")
    before = hashes(tmp_path)
    r = run("pretrain_gpt_moe.py", *ENTRY, "--data-path", prefix, "--data-cache-path", shared)
    one_line_error(r, "--data-cache-path", "writable by group or others", code=2)
    assert hashes(tmp_path) == before and sorted(os.listdir(shared)) == ["planted.npy"]


def test_the_default_cache_is_private_to_the_user(tmp_path, monkeypatch):
    """A data directory others can write (a shared one) no longer holds the default cache, nor does
    a fixed directory under the system temp dir: the user's own cache directory, created 0700."""
    from megatron_ted.data.gpt_data import default_cache_path, prepare_cache_dir
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = default_cache_path([str(data / "corpus_text_document")])
    assert cache == str(tmp_path / "xdg" / "megatron_ted" / "index-cache")
    prepare_cache_dir(cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    # a private data directory of the user's keeps the cache beside the data, also created 0700
    os.chmod(data, 0o700)
    cache = default_cache_path([str(data / "corpus_text_document")])
    assert cache == str(data / "index-cache")
    prepare_cache_dir(cache)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


@pytest.mark.skipif(not IS_ROOT, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(tmp_path):
    from megatron_ted.data.gpt_data import DataError, prepare_cache_dir
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(DataError, match="--data-cache-path .* owned by user id 65534"):
        prepare_cache_dir(str(theirs))
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "x.npy").write_bytes(b"")
    os.chown(mine / "x.npy", 65534, 65534)
    with pytest.raises(DataError, match="--data-cache-path .* holds x.npy, owned by user id 65534"):
        prepare_cache_dir(str(mine))


# ------------------------------------------------------------------------------ the other tools
@pytest.mark.parametrize("tool, typo, known", [
    ("tools/plan_ted.py", "--num-node", "--num-nodes"),
    ("tools/preprocess_data.py", "--output-prefx", "--output-prefix"),
    ("tools/prune_experts.py", "--keep-expert", "--keep-experts"),
    ("tools/make_corpus.py", "--max-dcs", "--max-docs"),
    ("tools/generate_text.py", "--max-new-token", "--max-new-tokens"),
    ("tools/train_tokenizer.py", "--vocab-sise", "--vocab-size"),
])
def test_an_unknown_flag_is_one_line_with_the_closest_known_one(tmp_path, tool, typo, known):
    r = run(tool, typo, "3", cwd=tmp_path)
    line = one_line_error(r, code=2)
    assert line == f"{os.path.basename(tool)}: error: unrecognized argument {typo} (did you mean {known}?)"
    assert os.listdir(tmp_path) == []


def test_train_tokenizer_invalid_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine first line"}\n{"text": "unterminated\n')
    before = hashes(tmp_path)
    r = run("tools/train_tokenizer.py", "--input", bad, "--vocab-size", "300", "--output-prefix",
            tmp_path / "tok")
    line = one_line_error(r, f"--input {bad} line 2: invalid JSON")
    assert ".py(" not in line
    assert hashes(tmp_path) == before


# ------------------------------------------------------- make_corpus / train_tokenizer outputs
def test_make_corpus_refuses_an_existing_output_unless_overwrite(tmp_path):
    out = tmp_path / "corpus.jsonl"
    out.write_text("the user's own corpus\n")
    before = hashes(tmp_path)
    line = one_line_error(run("tools/make_corpus.py", "--output", out, "--max-docs", "2"),
                          f"--output: {out} exists", "--overwrite", code=2)
    assert line.startswith("error:") and hashes(tmp_path) == before

    r = run("tools/make_corpus.py", "--output", out, "--max-docs", "2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2 and os.listdir(tmp_path) == ["corpus.jsonl"]


def test_make_corpus_output_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    before = hashes(tmp_path)
    one_line_error(run("tools/make_corpus.py", "--output", tmp_path / "afile" / "c.jsonl", "--max-docs", "1"),
                   "--output", "is a file, not a directory", code=2)
    assert hashes(tmp_path) == before


def test_train_tokenizer_refuses_existing_outputs_unless_overwrite(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    corpus = write_jsonl(tmp_path / "c.jsonl", 60)
    (tmp_path / "tok.vocab").write_text("the user's own vocabulary\n")   # one of the two is enough
    before = hashes(tmp_path)
    one_line_error(run("tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "300",
                       "--output-prefix", tmp_path / "tok", "--num-threads", "1"),
                   f"{tmp_path / 'tok.vocab'} exists", "--overwrite", code=2)
    assert hashes(tmp_path) == before

    r = run("tools/train_tokenizer.py", "--input", corpus, "--vocab-size", "300", "--output-prefix",
            tmp_path / "tok", "--num-threads", "1", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "tok.model", "tok.vocab"]  # no temporaries left
    assert "user's own" not in (tmp_path / "tok.vocab").read_text()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tok.model").read_bytes())
    assert proto.trainer_spec.model_prefix == str(tmp_path / "tok")  # not the temporary prefix


# -------------------------------------------------------------------- the process group rendezvous
def test_a_taken_master_port_is_one_line_naming_it(tmp_path):
    """A second plain `python pretrain_gpt_moe.py` on the default port: one line naming MASTER_PORT."""
    import socket

    with socket.socket() as taken:   # what the first run holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("pretrain_gpt_moe.py", *ENTRY, "--mock-data", cwd=tmp_path, env={"MASTER_PORT": str(port)})
    one_line_error(r, f"MASTER_PORT 127.0.0.1:{port} is already in use", "MASTER_PORT=", code=2)
    assert os.listdir(tmp_path) == []


def test_a_rendezvous_timeout_names_the_timeout_flag(tmp_path):
    """Rank 0 of two whose peer never comes: a one-line RendezvousError naming the timeout flag."""
    code = ("import os\n"
            "os.environ.update(RANK='0', WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT='0')\n"
            "from megatron_ted.parallel.groups import RendezvousError, init_process_group\n"
            "try:\n    init_process_group(False, 'gloo', timeout_minutes=0.03)\n"
            "except RendezvousError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stdout + r.stderr
    assert "--distributed-timeout-minutes 0.03" in r.stdout and "did not form" in r.stdout, r.stdout
