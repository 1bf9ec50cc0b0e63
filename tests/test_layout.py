"""The package's layering (scripts/import_graph.py): no cycles, no module importing a role above its own."""

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)


def test_the_sources_have_no_cycle_and_no_upward_import(capsys):
    assert import_graph.main([]) == 0
    assert capsys.readouterr().out.rstrip().endswith("0 cycle(s), 0 layering problem(s)")


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_an_upward_import_is_reported_lazy_or_not(tmp_path):
    src = _tree(
        tmp_path,
        {
            "afmp/__init__.py": "",
            "afmp/utils/__init__.py": "",
            "afmp/utils/files.py": "from afmp.training import rundir\n",  # utils -> training: up
            "afmp/training/__init__.py": "",
            "afmp/training/rundir.py": "from afmp.utils import files\n",  # down: fine (but a cycle)
            "afmp/training/run.py": "def hook():\n    from afmp.commands import viz\n",  # up, lazily
            "afmp/commands/__init__.py": "",
            "afmp/commands/viz.py": "import afmp.training.run\n",  # down: fine
            "afmp/commands/train.py": "if __name__ == '__main__':\n    import afmp_cli\n",  # a program's own entry
            "afmp_cli.py": "",
        },
    )
    graph, lazy = import_graph.read_graph(src)
    assert graph["afmp.utils.files"] == {"afmp.training.rundir"}
    assert lazy["afmp.training.run"] == {"afmp.commands.viz"}
    assert graph["afmp.commands.train"] == lazy["afmp.commands.train"] == set()
    assert import_graph.layering_problems(graph, lazy) == [
        "upward import: afmp.training.run (training) imports afmp.commands.viz (commands) (inside a function)",
        "upward import: afmp.utils.files (utils) imports afmp.training.rundir (training)",
    ]
    assert import_graph.cycles(graph) == [
        ["afmp.training.rundir", "afmp.utils.files", "afmp.training.rundir"]
    ]
    assert import_graph.main(["--src", str(src)]) == 1


def test_a_module_without_a_role_is_reported(tmp_path):
    src = _tree(tmp_path, {"afmp/__init__.py": "", "afmp/serving.py": "", "afmp/data/__init__.py": ""})
    graph, lazy = import_graph.read_graph(src)
    assert import_graph.role_of("afmp.data.stats") == import_graph.role_of("afmp.data")
    assert import_graph.role_of("afmp.models") > import_graph.role_of("afmp.registry")
    assert import_graph.layering_problems(graph, lazy) == [
        "no role: afmp.serving (give it one in scripts/import_graph.py's ROLES)"
    ]
