"""`pip install .` in a new virtualenv gives an importable learnloop whose modules are the notebooks' exports, with
the embedded data sample and a working `learnloop-demo` command."""
import subprocess, sys
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parent.parent

def run(*cmd, cwd=None):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout

def test_wheel_installs_in_a_fresh_virtualenv(tmp_path):
    run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', tmp_path / 'dist', ROOT)
    wheel, = (tmp_path / 'dist').glob('learnloop-*.whl')
    run(sys.executable, '-m', 'venv', tmp_path / 'venv')
    py = tmp_path / 'venv' / 'bin' / 'python'
    run(py, '-m', 'pip', 'install', '-q', f"torch=={torch.__version__.split('+')[0]}")  # torch first, as the README says
    run(py, '-m', 'pip', 'install', '-q', wheel)
    # run from tmp_path so that the clone's own learnloop/ folder cannot be imported by accident
    installed = Path(run(py, '-c', 'import learnloop, os; print(os.path.dirname(learnloop.__file__))', cwd=tmp_path).strip())
    assert installed != ROOT / 'learnloop'
    for src in [*(ROOT / 'learnloop').glob('*.py'), *(ROOT / 'learnloop' / 'fashion_sample').iterdir()]:
        dest = installed / src.relative_to(ROOT / 'learnloop')
        assert dest.read_bytes() == src.read_bytes(), f"{dest} differs from {src}"
    out = run(tmp_path / 'venv' / 'bin' / 'learnloop-demo', '--epochs', '1', cwd=tmp_path)
    assert 'valid accuracy' in out, out
    # fastprogress<1.1: 1.1 requires python-fasthtml, which brought a web server (uvicorn, starlette, ...) into every install
    installed_packages = run(py, '-m', 'pip', 'freeze', cwd=tmp_path).lower()
    for web in ('python-fasthtml', 'uvicorn', 'starlette'): assert web not in installed_packages, installed_packages

def test_every_global_name_the_modules_use_is_defined():
    "A notebook's test cells can hide a missing import (the notebook imported it); the exported module would then fail."
    import builtins, dis, importlib, pkgutil, types
    import learnloop
    def code_objects(co):
        yield co
        for const in co.co_consts:
            if isinstance(const, types.CodeType): yield from code_objects(const)
    undefined = []
    for info in pkgutil.iter_modules(learnloop.__path__):
        if info.name.startswith('_'): continue
        module = importlib.import_module(f'learnloop.{info.name}')
        source = compile(Path(module.__file__).read_text(), module.__file__, 'exec')
        for co in code_objects(source):
            for ins in dis.get_instructions(co):
                if ins.opname in ('LOAD_GLOBAL', 'LOAD_NAME') and ins.argval not in vars(module) \
                   and not hasattr(builtins, ins.argval):
                    undefined.append(f"learnloop.{info.name}: {co.co_name} uses {ins.argval}")
    assert not undefined, undefined

def test_every_package_the_modules_import_is_a_requirement():
    "A package imported when a module loads must be in settings.ini's requirements (numpy once was not)."
    import ast, configparser, importlib.metadata, re
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini')
    required = {re.split(r'[<>=!~;\[ ]', r)[0].lower() for r in cfg['DEFAULT']['requirements'].split()}
    dists = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((ROOT / 'learnloop').glob('*.py')):
        for node in ast.parse(path.read_text()).body:  # imports inside functions may be optional (e.g. IPython)
            if isinstance(node, ast.Import): names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0: names = [node.module]
            else: continue
            for top in {name.split('.')[0] for name in names} - set(sys.stdlib_module_names) - {'learnloop'}:
                if not any(d.lower() in required for d in dists.get(top, [top])): missing.append(f'{path.name}: {top}')
    assert not missing, f"imported but not in settings.ini's requirements: {missing}"
