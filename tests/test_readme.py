import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs_and_matches_examples_file(capsys):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    assert blocks[0].strip() == (ROOT / "examples" / "quickstart.py").read_text().split('"""', 2)[2].strip()
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "step 2: Avg Dq" in out and "frames per structure" in out
