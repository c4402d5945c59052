"""The house rules, checked on the source: imports run one way, the method has no Dagster, and
only the settings module reads the environment."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return names


def _py(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_resources_never_import_assets():
    bad = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.split(".")[0] == "lalp_assets")
           for p in _py("lalp_resources")}
    assert not {k: v for k, v in bad.items() if v}


def test_method_package_has_no_dagster():
    for p in _py("lalp_resources/method"):
        mods = _imports(p)
        assert not any(m.split(".")[0] == "dagster" or m.startswith("dagster_") for m in mods), p


def _reads_environment(path: Path) -> list[int]:
    """Line numbers of os.environ / os.getenv / os.putenv uses."""
    tree = ast.parse(path.read_text())
    lines = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "os" and n.attr in (
            "environ", "getenv", "putenv", "environb"
        ):
            lines.append(n.lineno)
        if isinstance(n, ast.ImportFrom) and n.module == "os" and any(a.name in ("environ", "getenv") for a in n.names):
            lines.append(n.lineno)
    return lines


def test_only_the_settings_module_reads_the_environment():
    allowed = {REPO / "lalp_resources" / "settings.py"}
    offenders = {}
    for p in _py("lalp_resources") + _py("lalp_assets"):
        if p in allowed:
            continue
        lines = _reads_environment(p)
        if lines:
            offenders[str(p.relative_to(REPO))] = lines
    assert not offenders, f"environment read outside lalp_resources/settings.py: {offenders}"


def test_nothing_cites_a_file_outside_the_repository():
    design = "DESIGN" + ".md"  # spelled apart so this file does not match itself
    for p in _py("lalp_resources") + _py("lalp_assets") + _py("tests") + _py("benchmarks"):
        assert design not in p.read_text(), p
    assert (REPO / "docs" / "method.md").is_file()
