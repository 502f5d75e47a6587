"""The wheel ships framework/, plugins/ and conf/ (as rlhf_conf), and the CLI works from it, not only editable."""

import subprocess
import sys
import tomllib
import zipfile

from conftest import REPO


def test_package_list_matches_the_tree():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("framework", "plugins")
        for p in (REPO / top).rglob("__init__.py")
    } | {"rlhf_conf"} | {
        ".".join(("rlhf_conf", *d.relative_to(REPO / "conf").parts))
        for d in (REPO / "conf").rglob("*") if d.is_dir() and d.name != "__pycache__"
    }
    assert declared == on_disk


def test_wheel_contains_configs_and_its_cli_answers(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("rlhf_lab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("rlhf_conf/config.yaml", "rlhf_conf/stage/pretrain.yaml", "rlhf_conf/model/tiny.yaml",
                "rlhf_conf/experiment/smoke.yaml", "framework/stages/pretrain.py", "plugins/datasets/chitchat.py"):
        assert cfg in names, cfg
    configs = {"rlhf_conf/" + p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert configs <= names, sorted(configs - names)  # every config, nested groups (labeller/gold) too
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys, framework; print(framework.__file__); sys.argv=['rlhf','--cfg','job','model.n_layer=3'];"
            "from framework.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout.splitlines()[0]
    assert "n_layer: 3" in out.stdout
