"""The README is the rendering of nbs/index.ipynb, and CI runs the README's test command.

`python tests/test_docs.py` rewrites README.md from nbs/index.ipynb (nbdev_readme needs Quarto; this does not)."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def render_readme():
    "README.md's text: the markdown cells of nbs/index.ipynb as they are, code cells in python fences."
    cells = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells']
    parts = []
    for cell in cells:
        src = ''.join(cell['source']).strip()
        if not src or src.startswith('#| hide'): continue
        parts.append(src if cell['cell_type'] == 'markdown' else f"```python\n{src}\n```")
    return '\n\n'.join(parts) + '\n'

def shell_commands(text):
    "The commands in the ```sh blocks of `text`."
    return [line.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines() if line.strip()]

def test_readme_is_index_rendered():
    assert (ROOT / 'README.md').read_text() == render_readme(), "README.md is stale: run `python tests/test_docs.py`"

def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    setup, test = shell_commands((ROOT / 'README.md').read_text())[:2]
    assert setup.startswith('pip install torch==') and setup.endswith('learnloop-demo')
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    assert any(line.strip().startswith(test) for line in ci), f".ci/run must run the README's test command: {test}"

if __name__ == '__main__':
    (ROOT / 'README.md').write_text(render_readme())
    print('README.md written from nbs/index.ipynb')
