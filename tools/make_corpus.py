#!/usr/bin/env python
"""Build a small English JSONL corpus ({"text": ...} per line) from the standard library's docstrings.

No network: the text is the docstrings of this interpreter's standard library (modules, classes,
functions, methods), one document per module, class or function, in a deterministic order
(modules sorted by name, members sorted by name), exact duplicates dropped.

    python tools/make_corpus.py --output corpus.jsonl [--max-docs N] [--min-chars 100] [--overwrite]

An existing --output is refused unless --overwrite; the corpus is written to a temporary next to it
and renamed into place at the end, so an interrupted run leaves no partial file.

Modules whose import has side effects (GUI, browser, printing, test suites) are never imported;
a module that fails to import is skipped. The full run gives a few MB of text in a few seconds.
The corpus depends on the Python version (the stdlib differs), not on the machine.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ted.cli import OneLineErrorParser  # noqa: E402
from megatron_ted.data.output_files import (  # noqa: E402
    create_temporary, make_output_dir, refuse_existing, remove_created_dirs, remove_temporaries)

# Never imported: side effects on import (browser, stdout, GUI, terminal), huge test suites, or
# platform-specific modules that only fail or warn.
SKIP_MODULES = {
    "antigravity", "this", "__hello__", "__phello__", "__main__",
    "tkinter", "turtle", "turtledemo", "idlelib", "pydoc_data",
    "test", "tests", "idle_test", "lib2to3", "ensurepip", "venv",
    "readline", "rlcompleter", "curses", "pty", "tty", "getpass",
    "msvcrt", "winreg", "winsound", "msilib", "nt", "_winapi",
    "xxsubtype", "xxlimited", "xxlimited_35", "distutils",
}


# Private pure-Python modules worth reading (the others are C accelerators or test helpers).
PRIVATE_MODULES = {
    "_pydecimal", "_pyio", "_pydatetime", "_collections_abc", "_strptime", "_threading_local",
    "_weakrefset", "_compression", "_markupbase", "_sitebuiltins", "_compat_pickle",
}

def stdlib_top_level_names() -> list[str]:
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:  # Python < 3.10: the stdlib is what lives in the stdlib directory
        stdlib_dir = os.path.dirname(os.__file__)
        names = {m.name for m in pkgutil.iter_modules([stdlib_dir])} | set(sys.builtin_module_names)
    return sorted(
        n for n in names
        if n not in SKIP_MODULES and (not n.startswith("_") or n in PRIVATE_MODULES)
    )


def quiet_import(name: str):
    """Import a module with stdout/stderr/warnings silenced; None if it fails."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def iter_modules():
    """Yield imported stdlib modules in sorted order, packages followed by their submodules."""
    for name in stdlib_top_level_names():
        yield from _walk(name)


def _walk(name: str):
    module = quiet_import(name)
    if module is None:
        return
    yield module
    path = getattr(module, "__path__", None)
    if not path:
        return
    children = sorted(m.name for m in pkgutil.iter_modules(path))
    for child in children:
        if child.startswith("_") or child in SKIP_MODULES:
            continue
        yield from _walk(f"{name}.{child}")


def clean(doc) -> str:
    if not isinstance(doc, str):
        return ""
    return inspect.cleandoc(doc).strip()


def signature(obj) -> str:
    """"(a, b=..., *args, key=..., **kwargs)": parameter names only. Default values are left out:
    their reprs can carry the machine's state (cgi.FieldStorage's default is os.environ)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return "(...)"
    out, kinds = [], inspect.Parameter
    for p in params:
        prefix = {kinds.VAR_POSITIONAL: "*", kinds.VAR_KEYWORD: "**"}.get(p.kind, "")
        default = "" if p.default is kinds.empty else "=..."
        out.append(f"{prefix}{p.name}{default}")
    return "(" + ", ".join(out) + ")"


def module_documents(module):
    """Yield (body, text) per document: the module docstring, each class (with its methods) and each
    function defined in the module. `body` is the docstrings alone, the key for de-duplication (the same
    docstring is often exposed by two modules, e.g. decimal and _pydecimal)."""
    name = module.__name__
    doc = clean(module.__doc__)
    if doc:
        yield doc, f"Module {name}\n\n{doc}"
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("__") or getattr(obj, "__module__", None) != name:
            continue  # dunder, or re-exported from another module (documented there)
        if inspect.isclass(obj):
            parts = [f"class {name}.{attr}{signature(obj)}\n\n{clean(obj.__doc__)}".rstrip()]
            bodies = [clean(obj.__doc__)]
            for meth_name, meth in sorted(vars(obj).items()):
                if meth_name.startswith("__") and meth_name != "__init__":
                    continue
                if isinstance(meth, (staticmethod, classmethod)):
                    meth = meth.__func__
                if isinstance(meth, property):
                    meth_doc, meth_sig = clean(meth.__doc__), ""
                elif callable(meth):
                    meth_doc, meth_sig = clean(meth.__doc__), signature(meth)
                else:
                    continue
                if meth_doc:
                    parts.append(f"{attr}.{meth_name}{meth_sig}\n\n{meth_doc}")
                    bodies.append(meth_doc)
            if any(bodies):
                yield "\n".join(bodies), "\n\n".join(parts)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = clean(obj.__doc__)
            if doc:
                yield doc, f"{name}.{attr}{signature(obj)}\n\n{doc}"


def build_corpus(max_docs: int | None = None, min_chars: int = 100):
    """Yield unique document texts of at least `min_chars` characters, at most `max_docs` of them."""
    seen: set[bytes] = set()
    count = 0
    for module in iter_modules():
        with warnings.catch_warnings():  # reading deprecated attributes (typing.io, ...) warns
            warnings.simplefilter("ignore")
            documents = list(module_documents(module))
        for body, text in documents:
            if len(text) < min_chars:
                continue
            try:
                key = hashlib.sha1(body.encode("utf-8")).digest()
            except UnicodeEncodeError:  # a lone surrogate in a docstring: not valid text
                continue
            if key in seen:
                continue
            seen.add(key)
            yield text
            count += 1
            if max_docs is not None and count >= max_docs:
                return


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after N documents")
    parser.add_argument("--min-chars", type=int, default=100, help="drop shorter documents")
    args = parser.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        parser.error("--max-docs must be >= 1")

    try:  # an existing --output stays as it was unless --overwrite; a failed run leaves nothing
        refuse_existing([args.output], "--output", args.overwrite)
        created = make_output_dir(args.output, "--output")
        tmp = create_temporary(args.output)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_docs = n_chars = 0
    done = False
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in build_corpus(args.max_docs, args.min_chars):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(text)
        os.replace(tmp, args.output)
        done = True
    finally:
        if not done:
            remove_temporaries([tmp])
            remove_created_dirs(args.output, created)
    print(f"wrote {n_docs} documents, {n_chars / 1e6:.2f}M characters to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
