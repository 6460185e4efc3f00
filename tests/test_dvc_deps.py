"""dvc.yaml declares exactly what each stage runs and reads (issue #12, item 4).

For every stage of dvc.yaml, resolved by DVC itself (``dvc.repo.Repo(root).index.stages``: foreach
stages expanded with ``${item}``/``${key}`` from params.yaml), this test works out statically, with
``ast`` and without running anything:

Code deps
  The stage's command is ``python -m vlbench <name> ...``. Its import closure starts at
  ``src/vlbench/__main__.py`` (included), ``vlbench/__init__.py`` and the module ``__main__.COMMANDS``
  maps ``<name>`` to, and follows every ``import``/``from ... import`` of a vlbench module anywhere in
  a module (inside functions too), relative imports resolved, ``from pkg import name`` counted as the
  submodule ``pkg.name`` when that is a module, ``importlib.import_module("vlbench....")`` with a
  constant name included, and the ``__init__.py`` of every package on the way. Each module file of the
  closure must be covered by a stage dep: a dep path equal to the file, or a folder containing it.

Params
  The params.yaml sections the stage's own code reads must be covered by its ``params:`` entries.
  Reads are looked for in the code the stage can reach: the module-level code of every module in its
  closure (``if __name__ == "__main__":`` blocks of imported modules excluded: they never run), the
  stage module's ``main``, and, transitively, every function or class named from reached code (a
  class counts whole, all its methods). So a stage that imports one helper from another stage's
  module does not inherit the sections only that module's ``run`` reads. Reads are found without
  regard to conditions: a read under ``if features_dir:`` counts for train_pixels too, which runs
  without --features (sound, at the cost of a rerun of pixel variants when that key changes).
  The bodies of the generic params accessors (``GENERIC``: ``load_params``, ``section``,
  ``variant``..., ``validate_all``) are not searched; calls to them are the reads:

  - ``section(raw, "<s>")`` reads section ``<s>``;
  - ``variant(raw, name)``, ``variant_params(raw, name)``, ``variant_group(raw, name)`` read
    ``<group>.<V>``, V being the ``--variant V`` of the stage's command and <group> the params.yaml
    section(s) that hold V (``variants`` or ``pixel_variants``); without ``--variant`` in the command
    they read every variant group whole;
  - ``variant_names(raw)`` reads every variant group (``VARIANT_GROUPS`` of the code);
  - ``raw["<s>"]`` / ``raw.get("<s>")``, ``raw`` being a name called ``raw`` or bound to the result
    of ``load_params(...)``, reads ``<s>``;
  - ``validate_all(raw)`` (the first stage's check of the whole file) counts as no read.

  A section name that is not a string literal is reported too: it cannot be checked.
  A read key R is covered by a declared key D when D == R, D is an ancestor of R (``train`` covers
  ``train.seed``) or D is below R (``train.seed`` covers a read of the whole ``train`` section:
  declaring every key of a section that the stage uses is allowed, as in
  ``features.image_size``); a whole-file params entry (``- params.yaml:`` with no keys) or a plain
  dep on params.yaml covers everything.

Declared deps or params that the stage does not need are not reported: over-declaring costs only a
needless rerun, under-declaring gives stale results. The failure message lists
``stage -> missing paths/keys`` so whoever moves code knows what to add to dvc.yaml.
"""
from __future__ import annotations

import ast
import functools
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "vlbench"

# the params accessors: calls to them are the reads; their bodies are not searched
GENERIC = {"load_params", "section", "variant", "variant_params", "variant_group", "variant_names",
           "validate_all", "build", "build_variant"}
VARIANT_READS = {"variant", "variant_params", "variant_group"}
DEFAULT_VARIANT_GROUPS = ("variants", "pixel_variants")  # when the code's VARIANT_GROUPS is not found


# ------------------------------------------------------------------------------------ the code


@dataclass
class Module:
    name: str
    path: Path
    is_pkg: bool
    tree: ast.Module
    defs: dict = field(default_factory=dict)  # top-level def/class name -> node
    bindings: dict = field(default_factory=dict)  # local name -> ("mod", m) | ("attr", m, name)
    imports: set = field(default_factory=set)  # vlbench modules it imports (anywhere)
    unresolved: list = field(default_factory=list)


class Code:
    """The vlbench modules under ``src_root``, parsed on demand."""

    def __init__(self, src_root: Path = SRC):
        self.src = src_root
        self._cache: dict[str, Module | None] = {}
        self._found: dict[str, tuple[Path, bool] | None] = {}
        self.reads: dict[str, list[Read]] = {}  # command module -> its reads (see Reach)

    def locate(self, name: str) -> tuple[Path, bool] | None:
        if name not in self._found:
            base = self.src.joinpath(*name.split("."))
            found = None
            if (base / "__init__.py").is_file():
                found = base / "__init__.py", True
            elif base.with_suffix(".py").is_file():
                found = base.with_suffix(".py"), False
            self._found[name] = found
        return self._found[name]

    def exists(self, name: str) -> bool:
        return self.locate(name) is not None

    def get(self, name: str) -> Module | None:
        if name not in self._cache:
            found = self.locate(name)
            self._cache[name] = None if found is None else self._parse(name, *found)
        return self._cache[name]

    def _parse(self, name: str, path: Path, is_pkg: bool) -> Module:
        tree = ast.parse(path.read_text(), str(path))
        m = Module(name, path, is_pkg, tree)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                m.defs[node.name] = node
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                        self._add(m, a.name, node)
                        if a.asname:
                            m.bindings[a.asname] = ("mod", a.name)
                        else:
                            m.bindings[a.name.split(".")[0]] = ("mod", PACKAGE)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    if a.name != "*" and self.exists(sub):
                        self._add(m, sub, node)
                        m.bindings[a.asname or a.name] = ("mod", sub)
                    else:
                        self._add(m, base, node)
                        if a.name != "*":
                            m.bindings[a.asname or a.name] = ("attr", base, a.name)
            elif (isinstance(node, ast.Call) and _callee_name(node) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                  and node.args[0].value.startswith(PACKAGE)):
                self._add(m, node.args[0].value, node)
        return m

    def _add(self, m: Module, name: str, node: ast.AST) -> None:
        if not self.exists(name):
            m.unresolved.append(f"{self.rel(m.path)}:{node.lineno} imports {name}, which is not a module")
            return
        m.imports.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a/__init__.py and a/b/__init__.py
            m.imports.add(".".join(parts[:i]))

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.src.parent)

    def closure(self, entries: list[str]) -> tuple[dict[str, Module], list[str]]:
        seen: dict[str, Module] = {}
        problems: list[str] = []
        todo = list(entries)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            m = self.get(name)
            if m is None:
                problems.append(f"module {name} not found under {self.src}")
                continue
            seen[name] = m
            problems += m.unresolved
            todo += sorted(m.imports)
            if "." in name:
                todo.append(name.rpartition(".")[0])
        return seen, problems

    def commands(self) -> dict[str, str]:
        """``python -m vlbench <name>`` -> module, from the dict literal(s) in __main__.py."""
        out = {}
        main = self.get(f"{PACKAGE}.__main__")
        for node in main.tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if not isinstance(value, ast.Dict):
                continue
            for k, v in zip(value.keys, value.values):
                if isinstance(v, (ast.Tuple, ast.List)) and v.elts:
                    v = v.elts[0]
                if (isinstance(k, ast.Constant) and isinstance(k.value, str) and isinstance(v, ast.Constant)
                        and isinstance(v.value, str) and v.value.startswith(PACKAGE)):
                    out[k.value] = v.value
        return out


def _callee_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


# ------------------------------------------------------------------------------------ reads


VARIANT = "<variant>"  # in a Read's key: the stage's --variant, filled in by check()


@dataclass(frozen=True)
class Read:
    key: str  # dotted params key, or "" when it cannot be told statically
    where: str
    what: str


class Reach:
    """Functions and classes a stage can run, and the params reads in them."""

    def __init__(self, code: Code, modules: dict[str, Module]):
        self.code, self.modules = code, modules
        self.reads: list[Read] = []
        self.done: set = set()
        self.todo: list = []
        self.groups = self._variant_groups()

    def _variant_groups(self) -> tuple[str, ...]:
        for m in self.modules.values():
            for node in m.tree.body:
                if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "VARIANT_GROUPS"
                                                         for t in node.targets)):
                    try:
                        return tuple(ast.literal_eval(node.value))
                    except ValueError:
                        pass
        return DEFAULT_VARIANT_GROUPS

    def run(self, stage_module: str) -> list[Read]:
        for m in self.modules.values():
            body = [n for n in m.tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and not (m.name != f"{PACKAGE}.__main__" and _is_main_guard(n))]
            for node in body:
                self.scan(m, node)
            for node in m.tree.body:  # decorators, bases and defaults run at import
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    at_import = [*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults)]
                elif isinstance(node, ast.ClassDef):
                    at_import = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
                else:
                    continue
                for sub in at_import:
                    self.scan(m, sub)
        self.reach(stage_module, "main")
        while self.todo:
            m, node = self.todo.pop()
            self.scan(m, node)
        return self.reads

    # which def a name stands for --------------------------------------------------------
    def resolve(self, mod: str, name: str, depth: int = 0):
        """(module, def name) that ``name`` in module ``mod`` refers to, or ("mod", m), or None."""
        m = self.code.get(mod)
        if m is None or depth > 10:
            return None
        if name in m.defs:
            return (mod, name)
        b = m.bindings.get(name)
        if b is None:
            sub = f"{mod}.{name}"
            return ("mod", sub) if self.code.exists(sub) else None
        if b[0] == "mod":
            return ("mod", b[1])
        return self.resolve(b[1], b[2], depth + 1)

    def resolve_expr(self, m: Module, node: ast.AST):
        if isinstance(node, ast.Name):
            return self.resolve(m.name, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve_expr(m, node.value)
            if base and base[0] == "mod":
                return self.resolve(base[1], node.attr)
        return None

    def callee(self, m: Module, call: ast.Call) -> str | None:
        """The name of the vlbench def a call runs; when that cannot be resolved (say an import of a
        name its module no longer defines, mid-refactor), the name it was imported or called as."""
        target = self.resolve_expr(m, call.func)
        if target and target[0] != "mod":
            return target[1]
        if isinstance(call.func, ast.Name):
            b = m.bindings.get(call.func.id)
            return b[2] if b and b[0] == "attr" else None
        if isinstance(call.func, ast.Attribute):
            base = self.resolve_expr(m, call.func.value)
            return call.func.attr if base and base[0] == "mod" else None
        return None

    def reach(self, mod: str, name: str) -> None:
        if (mod, name) in self.done or name in GENERIC:
            return
        self.done.add((mod, name))
        m = self.code.get(mod)
        if m is not None and name in m.defs:
            self.todo.append((m, m.defs[name]))

    # scanning -----------------------------------------------------------------------------
    def scan(self, m: Module, node: ast.AST) -> None:
        raw_names = {"raw"} | {t.id for n in ast.walk(node) if isinstance(n, ast.Assign) and _is_load_params(n.value)
                               for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(node):
            if isinstance(n, (ast.Name, ast.Attribute)):
                target = self.resolve_expr(m, n)
                if target and target[0] != "mod":
                    self.reach(*target)
            if isinstance(n, ast.Call):
                fn = self.callee(m, n)
                if fn in GENERIC:
                    self.call_read(m, n, fn)
                elif (isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args
                      and _is_raw(n.func.value, raw_names)):
                    self.key_read(m, n, n.args[0], "raw.get")
            if isinstance(n, ast.Subscript) and _is_raw(n.value, raw_names):
                self.key_read(m, n, n.slice, "raw[...]")

    def where(self, m: Module, n: ast.AST) -> str:
        return f"{self.code.rel(m.path)}:{n.lineno}"

    def key_read(self, m: Module, n: ast.AST, key: ast.AST, what: str) -> None:
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            self.reads.append(Read(key.value, self.where(m, n), what))
        else:
            self.reads.append(Read("", self.where(m, n), f"{what} with a computed section name"))

    def call_read(self, m: Module, call: ast.Call, fn: str) -> None:
        args = list(call.args) + [k.value for k in call.keywords if k.arg == "name"]
        if fn == "section":
            if len(args) > 1:
                self.key_read(m, call, args[1], "section(...)")
            else:
                self.reads.append(Read("", self.where(m, call), "section() without a section name"))
        elif fn == "variant_names":
            for g in self.groups:
                self.reads.append(Read(g, self.where(m, call), f"{fn}(...)"))
        elif fn in VARIANT_READS:
            for g in self.groups:
                self.reads.append(Read(f"{g}.{VARIANT}", self.where(m, call), f"{fn}(...)"))
        # load_params, validate_all, build, build_variant: no section of their own


def _is_main_guard(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in t.comparators))


def _is_load_params(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and _callee_name(node) == "load_params"


def _is_raw(node: ast.AST, raw_names: set) -> bool:
    return (isinstance(node, ast.Name) and node.id in raw_names) or _is_load_params(node)


# ------------------------------------------------------------------------------------ the check


def _expand(reads: list[Read], variant: str | None, params: dict) -> list[Read]:
    """Variant reads -> ``<group>.<V>`` for the group(s) holding the stage's ``--variant V``, or
    every group whole when the command names no variant."""
    out = []
    for r in reads:
        group, _, rest = r.key.partition(".")
        if rest != VARIANT:
            out.append(r)
        elif variant is None:
            out.append(Read(group, r.where, r.what))
        elif variant in (params.get(group) or {}):
            out.append(Read(f"{group}.{variant}", r.where, r.what))
    if variant is not None and any(r.key.endswith("." + VARIANT) for r in reads) and not any(
            r.key.endswith("." + variant) for r in out):
        where = next(r.where for r in reads if r.key.endswith("." + VARIANT))
        out.append(Read("", where, f"variant {variant!r} is in no variant group of params.yaml"))
    return out


def _covered_key(read: str, declared: list[str]) -> bool:
    return any(d == read or read.startswith(d + ".") or d.startswith(read + ".") for d in declared)


def _flag(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def load_stages(dvc_root: Path):
    """The stages of ``dvc_root``/dvc.yaml as DVC resolves them (foreach expanded)."""
    from dvc.repo import Repo

    repo = Repo(str(dvc_root))
    try:
        return repo.root_dir, list(repo.index.stages)
    finally:
        repo.close()


def check(dvc_root: Path = ROOT, src_root: Path = SRC) -> dict[str, list[str]]:
    """stage -> what is missing from its deps/params ({} when dvc.yaml is complete)."""
    from dvc.dependency.param import ParamsDependency

    root_dir, stages = load_stages(dvc_root)
    code = Code(src_root)
    commands = code.commands()
    closures: dict[str, tuple] = {}
    problems: dict[str, list[str]] = {}
    for stage in stages:
        out: list[str] = []
        cmds = stage.cmd if isinstance(stage.cmd, list) else [stage.cmd]
        deps = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
        dep_paths = [Path(os.path.relpath(d.fs_path, root_dir)) for d in deps]
        for cmd in filter(None, cmds):
            argv = shlex.split(cmd)
            if argv[:3] != ["python", "-m", PACKAGE] or len(argv) < 4:
                out.append(f"command {cmd!r} is not `python -m {PACKAGE} <stage>`: this test cannot follow it")
                continue
            name = argv[3]
            if name not in commands:
                out.append(f"`{PACKAGE} {name}` is not in {PACKAGE}/__main__.py's command table")
                continue
            if name not in closures:
                closures[name] = code.closure([f"{PACKAGE}.__main__", PACKAGE, commands[name]])
            modules, unresolved = closures[name]
            out += unresolved
            # code deps
            for mod in sorted(modules.values(), key=lambda m: m.name):
                rel = Path(code.rel(mod.path))
                if not any(rel == d or d in rel.parents for d in dep_paths):
                    out.append(f"dep {rel.as_posix()}")
            # params
            params_file = _flag(argv, "--params") or "params.yaml"
            params_abs = os.path.normpath(os.path.join(stage.wdir, params_file))
            if any(os.path.normpath(d.fs_path) == params_abs for d in deps):
                continue  # the whole file is a dep
            declared: list[str] = []
            whole = False
            for d in stage.deps:
                if isinstance(d, ParamsDependency) and os.path.normpath(d.fs_path) == params_abs:
                    keys = list(d.params or [])
                    whole |= not keys
                    declared += keys
            if whole:
                continue
            with open(params_abs) as f:
                params = yaml.safe_load(f) or {}
            if commands[name] not in code.reads:
                code.reads[commands[name]] = Reach(code, modules).run(commands[name])
            for r in sorted(set(_expand(code.reads[commands[name]], _flag(argv, "--variant"), params)),
                            key=lambda r: (r.key, r.where)):
                if not r.key:
                    out.append(f"unchecked read at {r.where}: {r.what}")
                elif not _covered_key(r.key, declared):
                    out.append(f"param {r.key} (read by {r.what} at {r.where})")
        if out:
            problems[stage.name] = sorted(set(out), key=out.index)
    return problems


def _message(problems: dict[str, list[str]]) -> str:
    lines = ["dvc.yaml misses what these stages run or read (add the dep paths / params keys):"]
    for stage, missing in problems.items():
        lines.append(f"  {stage} -> " + "; ".join(missing))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ tests

pytest.importorskip("dvc")


@functools.lru_cache(maxsize=None)
def _root_problems() -> dict[str, list[str]]:
    return check()


def test_every_stage_declares_its_code_and_params():
    problems = _root_problems()
    assert not problems, _message(problems)


def _project_copy(tmp_path: Path, edit) -> Path:
    """params.yaml and an edited dvc.yaml in a fresh DVC project (code stays under ROOT/src)."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    edit(dvc["stages"])
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    return tmp_path


def _body(stages: dict, name: str) -> dict:
    return stages[name].get("do", stages[name])


def test_checker_reports_a_removed_dep_and_param(tmp_path):
    """The check can fail: a dvc.yaml copy without train_pixels' own stage module in its deps, and
    without the `evaluate` section in evaluate's params, is reported for exactly those."""
    code = Code()
    train_py = code.rel(code.locate(code.commands()["train"])[0])
    removed = {}

    def edit(stages):
        tp = _body(stages, "train_pixels")
        assert train_py in tp["deps"], f"train_pixels should list {train_py} itself (not a folder above it)"
        tp["deps"] = [d for d in tp["deps"] if d != train_py]
        ev = _body(stages, "evaluate")
        removed["params"] = [p for p in ev["params"] if p == "evaluate" or p.startswith("evaluate.")]
        assert removed["params"], "evaluate should declare the evaluate section"
        ev["params"] = [p for p in ev["params"] if p not in removed["params"]]

    before = _root_problems()
    after = check(_project_copy(tmp_path, edit))
    new = {s: [p for p in ps if p not in before.get(s, [])] for s, ps in after.items()}
    new = {s: ps for s, ps in new.items() if ps}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = {f"train_pixels@{v}" for v in params.get("pixel_variants") or {}} | {
        f"evaluate@{v}" for v in params["variants"]}
    assert set(new) == expected, _message(after)
    for stage, missing in new.items():
        if stage.startswith("train_pixels@"):
            assert missing == [f"dep {train_py}"], _message(after)
        else:
            assert missing and all(m.startswith("param evaluate (read by section(...) at ") for m in missing), \
                _message(after)
    lines = _message(after).splitlines()
    assert any(ln.startswith("  train_pixels@") and f"dep {train_py}" in ln for ln in lines)
    assert any(ln.startswith("  evaluate@") and "param evaluate (" in ln for ln in lines)


FAKE = {
    "__init__.py": "",
    "__main__.py": """
import importlib
COMMANDS = {"a": ("vlbench.stages.a", "stage a"), "b": ("vlbench.stages.b", "stage b")}
def main(argv):
    from .config import ParamError
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
if __name__ == "__main__":
    main(None)
""",
    "config.py": """
VARIANT_GROUPS = ("variants", "pixel_variants")
class ParamError(ValueError): pass
def load_params(path="params.yaml"): return {}
def section(raw, name): return raw.get(name, {})
def variant_group(raw, name): return [g for g in VARIANT_GROUPS if name in raw[g]][0]
def variant(raw, name): return raw[variant_group(raw, name)][name]
def validate_all(raw):
    for name in raw: section(raw, name)
""",
    "util.py": "def u(): return 1\n",
    "unused.py": "",
    "lazy.py": "",
    "helpers/__init__.py": "",
    "helpers/h2.py": "",
    "stages/__init__.py": "",
    "stages/a.py": """
from .. import util
from ..config import load_params, section, validate_all, variant as get_variant
from .b import helper
def main(argv):
    raw = load_params()
    validate_all(raw)
    section(raw, "alpha"), get_variant(raw, argv[1]), raw.get("gamma"), util.u(), helper()
def later():
    from ..lazy import nothing
""",
    "stages/b.py": """
import vlbench.config as config
def helper():
    from ..helpers import h2
    return h2
def run():
    return config.section(config.load_params(), "beta")
def main(argv):
    run()
if __name__ == "__main__":
    main(None)
""",
}


def test_checker_on_a_made_up_package(tmp_path):
    """Imports inside functions, `from pkg import submodule`, aliases, folder deps, foreach over a
    dict, and reachability: stage a imports b.helper but never b.run, so it does not read `beta`."""
    from dvc.repo import Repo

    for rel, text in FAKE.items():
        f = tmp_path / "src" / PACKAGE / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "alpha": {"x": 1}, "beta": {"y": 2}, "gamma": 3,
        "variants": {"v1": {"k": 1}, "v2": {"k": 2}}, "pixel_variants": {}}))
    core = ["src/vlbench/__main__.py", "src/vlbench/__init__.py", "src/vlbench/config.py"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"foreach": "${variants}", "do": {
            "cmd": "python -m vlbench a --variant ${key}",
            "deps": [*core, "src/vlbench/stages", "src/vlbench/util.py", "src/vlbench/lazy.py"],
            "params": ["alpha.x", "variants.${key}"]}},
        "b": {"cmd": "python -m vlbench b",
              "deps": [*core, "src/vlbench/stages/__init__.py", "src/vlbench/stages/b.py", "src/vlbench/helpers"],
              "params": ["beta"]},
    }}, sort_keys=False))
    problems = check(tmp_path, tmp_path / "src")
    expected = ["dep src/vlbench/helpers/__init__.py", "dep src/vlbench/helpers/h2.py",
                "param gamma (read by raw.get at src/vlbench/stages/a.py:8)"]
    assert problems == {"a@v1": expected, "a@v2": expected}, _message(problems)
