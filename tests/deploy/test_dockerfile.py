"""The Dockerfile, read by Docker's own (BuildKit) parser through the `dockerfile`
package: targets, pinned bases, no torch in the server images, exec forms."""
from __future__ import annotations

import re
import tomllib

import pytest

from deploy_helpers import DOCKERFILE, REPO_ROOT, load_compose

dockerfile = pytest.importorskip("dockerfile", reason="the `dockerfile` package (BuildKit's parser) is not installed")


def _stages() -> dict[str, dict]:
    """{stage: {"base": image, "commands": [Command]}}, ARG defaults substituted in FROM."""
    args, stages, current = {}, {}, None
    for c in dockerfile.parse_file(str(DOCKERFILE)):
        if c.cmd == "ARG" and current is None:
            name, _, default = c.value[0].partition("=")
            args[name] = default
        elif c.cmd == "FROM":
            assert len(c.value) == 3 and c.value[1].upper() == "AS", f"unnamed stage: {c.original}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), c.value[0])
            current = stages[c.value[2]] = {"base": base, "commands": []}
        elif current is not None:
            current["commands"].append(c)
    return stages


def _chain(stages: dict, name: str) -> list[str]:
    """The stage and the stages it is built on, nearest first."""
    out = [name]
    while stages[out[-1]]["base"] in stages:
        out.append(stages[out[-1]]["base"])
    return out


def _runs(stages: dict, name: str) -> list[str]:
    return [c.value[0] for s in _chain(stages, name) for c in stages[s]["commands"] if c.cmd == "RUN"]


def test_targets_exist_for_every_compose_build():
    stages = _stages()
    targets = {spec["build"]["target"] for spec in load_compose()["services"].values() if "build" in spec}
    assert targets == {"trainer", "server", "server-gpu"} and targets <= set(stages)


def test_base_images_are_pinned():
    stages = _stages()
    for name, stage in stages.items():
        if stage["base"] in stages:
            continue
        image, _, tag = stage["base"].rpartition(":")
        assert image and re.search(r"\d+\.\d+\.\d+", tag), f"{name}: base {stage['base']!r} has no version tag"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", stages["server-gpu"]["base"])


def test_server_images_never_install_torch():
    stages = _stages()
    for name in ("server", "server-gpu"):
        runs = _runs(stages, name)
        installs = " ".join(part for run in runs for part in run.split("&&") if "pip install" in part)
        assert "torch" not in installs and "[train]" not in installs, f"{name}: {installs}"
        # and the build itself fails if torch arrived anyway (say through a dependency)
        assert any(re.search(r'&& ! python -c "import torch"', run) for run in runs), f"{name}: no guard"
    assert any("numba-cuda[cu13]" in run for run in _runs(stages, "server-gpu"))


def test_trainer_installs_the_pinned_torch():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["optional-dependencies"]["train"] if d.startswith("torch"))
    runs = _runs(_stages(), "trainer")
    assert any(f" {torch_pin}" in run and "--index-url" in run for run in runs), runs
    assert any("[train]" in run for run in runs)


def test_images_run_unprivileged_with_exec_form_commands():
    stages = _stages()
    for name in ("trainer", "server", "server-gpu"):
        commands = stages[name]["commands"]
        users = [c.value[0] for c in commands if c.cmd == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        assert any(c.cmd == "COPY" and c.value == ("deploy/", "deploy/") for c in commands), name
        # exec form: no shell between Docker and the process, so SIGTERM reaches it
        for c in commands:
            if c.cmd in ("CMD", "ENTRYPOINT"):
                assert c.json, f"{name}: {c.cmd} in shell form would swallow SIGTERM"
    for name in ("server", "server-gpu"):
        (check,) = [c for c in stages[name]["commands"] if c.cmd == "HEALTHCHECK"]
        assert check.json and check.value[:3] == ("CMD", "python", "deploy/healthcheck.py")


def test_each_image_installs_a_wheel_built_on_its_own_python_with_the_c_hot_path():
    """The wheel carries a C extension (serving/_hotpath.c): an image must install one
    compiled against its own Python, so each server copies its wheel from a stage on
    its own base image, and that stage has a compiler and checks the extension is in."""
    stages = _stages()

    def root(name):
        return stages[_chain(stages, name)[-1]]["base"]

    for name in ("trainer", "server", "server-gpu"):
        builders = {c.original.split()[1].split("=", 1)[1]
                    for s in _chain(stages, name) for c in stages[s]["commands"]
                    if c.cmd == "COPY" and c.original.startswith("COPY --from=")}
        assert len(builders) == 1, f"{name}: copies a wheel from {builders}"
        builder = builders.pop()
        assert root(builder) == root(name), f"{name} ({root(name)}) installs a wheel built on {root(builder)}"
        runs = " ".join(_runs(stages, builder))
        assert "gcc" in runs and "serving/_hotpath" in runs, f"{builder}: {runs}"
