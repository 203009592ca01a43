"""The installed package: typed, stubs true to the compiled module."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import gpusnap
import gpusnap._native as native


def stub_tree() -> ast.Module:
    return ast.parse((Path(gpusnap.__file__).parent / "_native.pyi").read_text())


def test_the_package_is_typed_and_versioned():
    assert (Path(gpusnap.__file__).parent / "py.typed").exists()
    assert gpusnap.__version__ == native.__version__
    assert gpusnap.PROTOCOL_VERSION >= 1
    assert gpusnap.DEFAULT_SOCKET.endswith(".sock")


def test_the_stubs_name_exactly_what_the_native_module_has():
    tree = stub_tree()
    stubbed = {
        n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
    } | {
        t.id
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and isinstance(t := n.target, ast.Name)
    }
    public = {n for n in dir(native) if not n.startswith("_") or n == "__version__"}
    assert stubbed == public
    client_stub = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Client")
    stub_methods = {n.name for n in client_stub.body if isinstance(n, ast.FunctionDef)} - {"__init__"}
    native_methods = {
        n for n, _ in inspect.getmembers(native.Client) if not n.startswith("_")
    }
    assert stub_methods == native_methods


def test_every_public_name_is_exported():
    for name in gpusnap.__all__:
        assert hasattr(gpusnap, name), name
