"""litft's modules import downward only (ARCHITECTURE.md): a module may import its own layer and the layers below.

Every import counts, at module level or inside a function: an import inside a function is no way around the order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LITFT = Path(__file__).resolve().parents[1] / "litft"

# Bottom to top. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[list[str]] = [
    ["litft.utils", "litft"],  # "litft": the package's own __init__ (the longest prefix wins for the rest)
    ["litft.native", "litft.cpu_kernels"],
    ["litft.models", "litft.tokenizer", "litft.chat_template"],
    ["litft.checkpoint", "litft.convert", "litft.gguf"],
    ["litft.adapters"],
    ["litft.methods"],
    ["litft.data"],
    ["litft.generate", "litft.chat", "litft.evaluate"],
    ["litft.train", "litft.distributed", "litft.ray_launch", "litft.plot", "litft.demo"],
    ["litft.cli", "litft.__main__"],
]


def layer_of(module: str) -> int:
    best = max(((len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py (and ARCHITECTURE.md)")
    return best[1]


def module_name(path: Path, root: Path = LITFT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def litft_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported litft module) for every import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "litft"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "litft":
                # `from litft import native` imports litft.native; `from litft.x import f` imports litft.x
                found += [(node.lineno, f"{base}.{a.name}" if base == "litft" else base) for a in node.names]
    return found


def upward_imports(root: Path = LITFT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        mine = layer_of(module)
        for line, imported in litft_imports(path, module):
            if layer_of(imported) > mine:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {module} (layer {mine}) imports {imported} "
                           f"(layer {layer_of(imported)})")
    return bad


def test_imports_go_down_the_layers():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself can fail: a low module importing the CLI is reported, inside a function too."""
    pkg = tmp_path / "litft"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "gpt.py").write_text("import torch\nfrom litft.utils import LitftError\n\n"
                                           "def f():\n    from litft.train import finetune\n")
    (pkg / "utils.py").write_text("from litft import cli\n")
    bad = upward_imports(pkg)
    assert len(bad) == 2 and "litft.models.gpt (layer 2) imports litft.train" in bad[0] and "litft.cli" in bad[1]


@pytest.mark.parametrize("module", ["litft.models.gpt", "litft.adapters.lora", "litft.methods.run_dir", "litft.cli"])
def test_every_module_has_a_layer(module):
    assert 0 <= layer_of(module) < len(LAYERS)
