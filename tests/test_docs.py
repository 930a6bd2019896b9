"""The README is the rendering of nbs/index.ipynb, and CI runs the README's test command.

`python tests/test_docs.py` rewrites README.md from nbs/index.ipynb (nbdev_readme needs Quarto; this does not).
Links to the lessons are written relative to `nbs/` in the notebook (so they work on the docs site, which is built
from inside `nbs/`, and on GitHub's view of the notebook); the README, at the top of the repository, gets `nbs/` in
front of them."""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def render_readme():
    "README.md's text: the markdown cells of nbs/index.ipynb with lesson links under nbs/, code cells in python fences."
    cells = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells']
    parts = []
    for cell in cells:
        src = ''.join(cell['source']).strip()
        if not src or src.startswith('#| hide'): continue
        if cell['cell_type'] == 'markdown': parts.append(re.sub(r"\]\((\w+\.ipynb)\)", r"](nbs/\1)", src))
        else: parts.append(f"```python\n{src}\n```")
    return '\n\n'.join(parts) + '\n'

def shell_commands(text):
    "The commands in the ```sh blocks of `text`."
    return [line.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines() if line.strip()]

def test_readme_is_index_rendered():
    assert (ROOT / 'README.md').read_text() == render_readme(), "README.md is stale: run `python tests/test_docs.py`"

def test_lesson_links_point_at_notebooks_that_exist():
    links = re.findall(r"\]\(nbs/(\w+\.ipynb)\)", render_readme())
    assert len(links) >= 14
    for name in links: assert (ROOT / 'nbs' / name).exists(), name

def test_readme_setup_installs_torch_first_and_ci_runs_the_test_command():
    commands = shell_commands((ROOT / 'README.md').read_text())
    users = commands.index('pip install learnloop')
    assert commands[users - 1].startswith('pip install torch'), "users install torch before learnloop"
    setup = next(c for c in commands if '-e ".[dev]"' in c)
    assert setup.startswith('pip install torch==') and setup.endswith('learnloop-demo')
    assert commands[commands.index(setup) - 1].startswith('python -m venv .venv'), "contributors make a virtualenv first"
    test = next(c for c in commands if 'nbdev_test' in c)
    assert 'OMP_NUM_THREADS' not in test, "the test command needs no environment variable"
    ci = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    assert test in ci, f".ci/run must run the README's test command as it is written: {test}"

if __name__ == '__main__':
    (ROOT / 'README.md').write_text(render_readme())
    print('README.md written from nbs/index.ipynb')
