"""The package's shape: one import direction, no import circle, small modules, a short call path.

Layers, lowest first (a module imports only from its own layer or below):
  leaves   resnet_fused._layout, activations, _kernel_fakes, backends, reference, triton/*, _C
  ops      resnet_fused.ops.*            (the torch ops, their autograd, the public functions)
  nn       resnet_fused.nn.*, tuning, convert, models.*, functional (re-exports)
  tools    resnet_fused.bench.*
"""

import ast
import pathlib
import sys

import pytest
import torch

PKG = pathlib.Path(__file__).resolve().parent.parent / "resnet_fused"
LAYERS = {"leaf": 0, "ops": 1, "nn": 2, "tools": 3}
MAX_LINES = 400


def _layer(module: str) -> int:
    parts = module.split(".")[1:]  # without "resnet_fused"
    if not parts or parts[0] in ("__init__", "__main__"):
        return LAYERS["nn"]  # the package root re-exports everything
    head = parts[0]
    if head in ("_layout", "activations", "_kernel_fakes", "backends", "reference", "triton", "_C"):
        return LAYERS["leaf"]
    if head == "ops":
        return LAYERS["ops"]
    if head == "bench":
        return LAYERS["tools"]
    return LAYERS["nn"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """resnet_fused modules `name` imports, at the top or inside a function (both count: a function-level
    import is still a dependency, and one that goes back up a layer is a hidden circle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package's ancestors
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    modules = _modules()
    # the package root is loaded before any of its modules: `from resnet_fused import x` depends on x only
    return {m for m in found if m in modules and m not in (name, "resnet_fused")}


def test_one_import_direction():
    wrong = []
    for name, path in _modules().items():
        for dep in _imports(name, path):
            if _layer(dep) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not wrong, "imports going up a layer:\n" + "\n".join(wrong)


def test_no_import_circle():
    graph = {name: _imports(name, path) for name, path in _modules().items()}
    # a package imports its submodules by design (re-exports); circles through a package's own
    # __init__ from below are the ones that break (a submodule importing its package)
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in graph[n]:
            if n.startswith(d + "."):  # a submodule reading its parent package (loaded first anyway)
                continue
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_modules_are_small():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_assert_guards_in_the_package():
    """`python -O` strips asserts: real conditions raise."""
    found = [f"{name}:{node.lineno}" for name, path in _modules().items()
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assert)]
    assert not found, f"assert statements: {found}"


def test_kernel_fakes_load_with_the_schemas():
    """The C++ library names the module of its fakes (m.set_python_module), and that module registered them."""
    from resnet_fused import backends
    from resnet_fused.ops.kernels import KERNELS

    if not backends.has_extension():
        pytest.skip("resnet_fused._C is not built")
    for op in KERNELS:
        stub = torch._C._dispatch_pystub(f"resnet_fused::{op}", "")
        assert stub is not None and stub[0] == "resnet_fused._kernel_fakes", (op, stub)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "Meta") or \
            torch._library.simple_registry.singleton.find(f"resnet_fused::{op}").fake_impl.kernel is not None, op


class _Stacks(torch.utils._python_dispatch.TorchDispatchMode):
    """At every op dispatched, the resnet_fused source files on the Python stack."""

    def __init__(self):
        super().__init__()
        self.deepest: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        files, frame = [], sys._getframe(1)
        while frame is not None:
            path = pathlib.Path(frame.f_code.co_filename)
            if PKG in path.parents and str(path.relative_to(PKG)) not in files:
                files.append(str(path.relative_to(PKG)))
            frame = frame.f_back
        if len(files) > len(self.deepest):
            self.deepest = files
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_block_training_call_crosses_at_most_four_files(backend):
    """FusedBasicBlock.forward in training reaches every kernel through at most four resnet_fused files
    (cpu: nn/blocks.py -> nn/conv_bn.py -> ops/conv_bn_act.py -> ops/bn_act.py; triton: the deferred
    chain, through ops/conv_stats.py), helpers that return before the launch included."""
    from resnet_fused import backends
    from resnet_fused.nn import FusedBasicBlock

    if not backends.available()[backend]:
        pytest.skip(f"the {backend} backend cannot run here")
    block = FusedBasicBlock(8, 8, backend=backend).train()
    x = torch.randn(2, 8, 6, 6, device="cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    x = x.contiguous(memory_format=torch.channels_last)
    with _Stacks() as stacks:
        block(x)
    assert len(stacks.deepest) <= 4, f"a kernel launched {len(stacks.deepest)} files deep: {list(reversed(stacks.deepest))}"
