"""The package's layers (docs/design.md), read from the import statements of every source file: the library never
imports the experiments or the command line, no c3a module imports another's private names, and there are no
import cycles. Imports inside functions count too: a lazy import is still a dependency."""

import ast
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
# On top of both the library and the experiments; nothing in the library may import them.
TOP = {"c3a.cli", "c3a.analysis_cli", "c3a.analysis"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted((SRC / "c3a").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, str]]:
    """``(c3a module, imported name or "")`` for every import statement of module ``name``, relative ones resolved;
    ``from package import submodule`` counts as importing the submodule."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (base, alias.name))
    return [(module, imported) for module, imported in found if module in MODULES]


def _graph(modules=MODULES) -> dict[str, set[str]]:
    return {name: {module for module, _ in _imports(name)} - {name} for name in modules}


def _library(name: str) -> bool:
    return not (name == "c3a.experiments" or name.startswith("c3a.experiments.") or name in TOP)


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a path that returns to its start, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_sources_are_found_and_read():  # relative, absolute and package-level imports all resolved
    graph = _graph()
    assert {"c3a.blocksize", "c3a.config", "c3a.layer"} <= graph["c3a.tuner"]
    assert {"c3a.rank", "c3a.experiments.params"} <= graph["c3a.analysis_cli"]
    assert {"c3a", "c3a.blocksize"} <= graph["c3a.experiments.methods"]


def test_the_library_imports_neither_experiments_nor_command_line():
    graph = _graph()
    wrong = {name: sorted(m for m in deps if not _library(m)) for name, deps in graph.items() if _library(name)}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_no_import_cycles_among_c3a_modules():
    assert _cycle(_graph()) == []


def test_cycle_finder_finds_a_cycle():  # the check above could not fail if this found nothing
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_private_names_of_another():
    private = sorted(f"{name}: {module}.{imported}" for name in MODULES for module, imported in _imports(name)
                     if imported.startswith("_") and module != name)
    assert private == []


def test_injecting_auto_block_sizes_loads_neither_analysis_nor_experiments():
    """What the static check says, at run time: the tuner resolves ``block_size="auto"`` with c3a.blocksize alone."""
    code = (
        "import sys, torch, c3a\n"
        "from peft import get_peft_model\n"
        "net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32))\n"
        "model = get_peft_model(net, c3a.C3AConfig(block_size='auto', lora_rank=2, target_modules=['0', '2']))\n"
        "assert model.peft_config['default'].block_size == 8, model.peft_config['default']\n"
        "print(sorted(m for m in sys.modules if m.startswith('c3a')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert "c3a.blocksize" in loaded
    assert [m for m in loaded if not _library(m) or m in ("c3a.rank", "c3a.export", "c3a.adapters")] == []


OLD_ANALYSIS_NAMES = {  # every public name c3a.analysis defined, and where it lives now
    "c3a.adapters": ["KERNEL_SUFFIX", "PREFIX", "adapter_kernels", "load_adapter"],
    "c3a.blocksize": ["DEFAULT_LORA_RANK", "BlockSizeChoice", "as_block_size_config", "choose_block_sizes",
                      "suggest_block_size", "target_shapes"],
    "c3a.export": ["LORA_BIAS", "LoraExport", "LowRank", "low_rank_factors", "to_lora"],
    "c3a.rank": ["LayerRank", "adapter_ranks", "delta_rank", "delta_singular_values", "layer_rank",
                 "lora_layer_ranks"],
    "c3a.experiments.params": ["COMPLEXITY", "HEAD_MODULES", "PAPER", "Complexity", "ParamReport",
                               "count_parameters"],
}


@pytest.mark.parametrize("home", sorted(OLD_ANALYSIS_NAMES))
def test_c3a_analysis_still_offers_its_old_names(home):
    import importlib

    import c3a.analysis

    module = importlib.import_module(home)
    for name in OLD_ANALYSIS_NAMES[home]:
        assert getattr(c3a.analysis, name) is getattr(module, name), name
    assert sorted(c3a.analysis.__all__) == sorted(n for names in OLD_ANALYSIS_NAMES.values() for n in names)


REGISTERED = (
    "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
    "from peft.utils import PeftType\n"
    "print(PEFT_TYPE_TO_TUNER_MAPPING[PeftType.C3A].__module__)\n"
)


@pytest.mark.parametrize("first", [
    "import c3a\nimport peft",  # the README's order
    "import peft\nimport c3a",
    "from c3a.config import C3AConfig",  # a c3a module that imports PEFT itself
    "import c3a, importlib.util\nimportlib.util.find_spec('peft')\nimport transformers.modeling_utils\nimport peft",
])
def test_importing_c3a_registers_its_tuner_whichever_comes_first(first):
    """``import c3a`` imports neither torch nor PEFT (the command answers --help at once) and still registers its
    tuner, the moment PEFT is imported; a spec lookup of PEFT (transformers' availability check) loads nothing."""
    code = (
        "import sys\n" + first + "\n" + REGISTERED
        + "print(type(sys.modules['peft'].__spec__.loader).__module__)\n"  # PEFT's own loader, not c3a's wrapper
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["c3a.tuner", "_frozen_importlib_external"]


def test_import_c3a_alone_imports_neither_torch_nor_peft():
    code = "import sys, c3a\nprint(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))\n" + (
        "c3a.C3ALinear\n" + REGISTERED)  # a public name, imported on first use, registers too
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "c3a.tuner"]
