"""The packages import downward only (docs/extending.md): every import, at module level or inside a function, of
every source file, read with ast. A new import that reaches up a layer, or MMDetection / MMSegmentation / mmengine
imported by the trainer, fails here with the file and line."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MM = {"mmdet", "mmseg", "mmengine", "mmcv"}
# package -> the packages of ours it may import (itself always); the layers of docs/extending.md, bottom first
ALLOWED = {
    "lifecycle": set(),
    "datakit": {"lifecycle"},
    "mmstack": {"lifecycle"},
    "classification": {"lifecycle", "datakit"},
    "export": {"lifecycle", "classification", "mmstack"},
    "transfer": {"lifecycle", "datakit", "classification", "export", "mmstack"},
    "detection": {"lifecycle", "transfer", "export", "mmstack"},
    "segmentation": {"lifecycle", "transfer", "export", "mmstack"},
    # the top: it runs every stage through its command line, and loads the recipes (mmengine configs) to plan them
    "study": {"lifecycle", "datakit", "classification", "export", "transfer"},
}
NO_MM = {"lifecycle", "datakit", "classification"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_packages_import_downward_only():
    ours = set(ALLOWED)
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for line, module in imports(path):
                where = f"{path.relative_to(REPO)}:{line}"
                if module in ours and module != package and module not in allowed:
                    wrong.append(f"{where} imports {module}")
                if package in NO_MM and module in MM:
                    wrong.append(f"{where} imports {module} (no OpenMMLab below export/)")
    assert not wrong, "\n".join(wrong)


def test_the_classification_package_holds_no_export_code():
    names = {p.stem for p in (REPO / "classification").glob("*.py")}
    assert not names & {"export", "export_refresh", "published"}, names
    for path in (REPO / "classification").glob("*.py"):
        assert "write_export" not in path.read_text(), path
