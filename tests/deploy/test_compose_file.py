"""docker-compose.yml, .env.example and deploy/prometheus.yml:
validated by the real compose parser and checked against what the issue asks."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from deploy_helpers import (COMPOSE_FILE, ENV_EXAMPLE, REPO_ROOT, compose_defaults, duration_s,
                      load_compose, read_env_file, split_port, split_volume)

PROFILES = {"default": [], "gpu": ["--profile", "gpu"], "monitoring": ["--profile", "monitoring"]}


def _compose(docker_compose, tmp_path, *args, env_file=None):
    """Run docker-compose on the repo's file with only the given env file (no stray .env, no SEQSERVE_*)."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQSERVE_", "PROMETHEUS_", "COMPOSE_"))}
    cmd = [docker_compose["exe"], "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_real_compose_parser_accepts_each_profile(docker_compose, tmp_path, profile):
    # profiles arrived in docker-compose 1.28; an older parser would ignore them silently
    assert docker_compose["version"] >= (1, 28, 0), f"{docker_compose['line']}: too old for profiles"
    res = _compose(docker_compose, tmp_path, *PROFILES[profile], "config", "-q")
    assert res.returncode == 0, f"{docker_compose['line']} rejects profile {profile}:\n{res.stderr}"
    assert res.stdout == "", "config -q should print nothing"
    if docker_compose["v2"]:  # only v2 filters `config --services` by the active profiles
        res = _compose(docker_compose, tmp_path, *PROFILES[profile], "config", "--services")
        services = set(res.stdout.split())
        expected = {"default": {"trainer", "server"}, "gpu": {"trainer", "server", "server-gpu"},
                    "monitoring": {"trainer", "server", "prometheus"}}[profile]
        assert services == expected


def test_env_example_values_are_the_compose_defaults(docker_compose, tmp_path):
    # resolved by the real parser: with .env.example as the env file and with none at all
    bare = _compose(docker_compose, tmp_path, "--profile", "gpu", "--profile", "monitoring", "config")
    example = _compose(docker_compose, tmp_path, "--profile", "gpu", "--profile", "monitoring", "config",
                       env_file=ENV_EXAMPLE)
    assert bare.returncode == 0 and example.returncode == 0, bare.stderr + example.stderr
    assert example.stdout == bare.stdout


def test_own_interpolation_matches_the_real_parser(docker_compose, tmp_path):
    # the host-run tests resolve the file with conftest.interpolate: prove it agrees with compose
    env = {"SEQSERVE_TRAIN_ARGS": "--epochs 2 --hidden 8", "SEQSERVE_SNAPSHOT_S": "7",
           "SEQSERVE_DEVICE": "auto", "SEQSERVE_STOP_GRACE_PERIOD": "45s"}
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    res = _compose(docker_compose, tmp_path, "--profile", "gpu", "config", env_file=env_file)
    assert res.returncode == 0, res.stderr
    real = yaml.safe_load(res.stdout)["services"]
    ours = load_compose(env)["services"]
    for name in ("trainer", "server", "server-gpu"):
        assert [str(a) for a in real[name]["command"]] == [str(a) for a in ours[name]["command"]], name
    for name in ("server", "server-gpu"):
        assert [str(a) for a in real[name]["healthcheck"]["test"]] == ours[name]["healthcheck"]["test"]
        assert duration_s(real[name]["stop_grace_period"]) == duration_s(ours[name]["stop_grace_period"]) == 45
        assert {k: str(v or "") for k, v in real[name]["environment"].items()} == \
            {k: str(v or "") for k, v in ours[name]["environment"].items()}
    assert "--epochs 2 --hidden 8" in ours["trainer"]["command"]


def test_every_variable_is_documented_in_env_example():
    defaults = compose_defaults()
    documented = read_env_file(ENV_EXAMPLE)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used == set(defaults), f"variables without a default in docker-compose.yml: {used - set(defaults)}"
    assert set(documented) == used, (f"missing from .env.example: {used - set(documented)}; "
                                     f"unused there: {set(documented) - used}")
    for key, default in defaults.items():
        assert documented[key] == default, f"{key}: .env.example says {documented[key]!r}, compose {default!r}"
    # each setting has a comment right above it (or above its group)
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = [s for s in lines[:i] if s.strip()]
            assert above and (above[-1].startswith("#") or "=" in above[-1]), f"undocumented: {line}"


def test_services_follow_the_issue():
    doc = load_compose()
    services = doc["services"]
    assert set(services) == {"trainer", "server", "server-gpu", "prometheus"}

    trainer = services["trainer"]
    assert "profiles" not in trainer and trainer["restart"] == "no"
    assert any(split_volume(v) == ("model_repository", "/models") for v in trainer["volumes"])
    assert trainer["build"]["target"] == "trainer"

    for name in ("server", "server-gpu"):
        s = services[name]
        assert s["depends_on"] == {"trainer": {"condition": "service_completed_successfully"}}
        assert s["restart"] == "unless-stopped"
        assert s["build"]["target"] == name
        cmd = s["command"]
        assert cmd[:2] == ["seqserve", "serve"]
        flag = lambda f: cmd[cmd.index(f) + 1]  # noqa: E731
        # published ports are the ones the server listens on
        container_ports = {split_port(p)[1] for p in s["ports"]}
        assert container_ports == {int(flag("--port")), int(flag("--metrics-port"))} == {50051, 8002}
        assert flag("--host") == "0.0.0.0"
        # model repository read-only; session state on its own named volume
        vols = dict(split_volume(v)[::-1] for v in s["volumes"])
        assert vols[flag("--repo")] == "model_repository"
        state_volume = vols[flag("--state-dir")]
        assert state_volume in doc["volumes"] and not state_volume.startswith((".", "/"))
        assert any(v.endswith(":ro") for v in s["volumes"] if v.startswith("model_repository:"))
        # the health check asks grpc.health.v1 (deploy/healthcheck.py), not a TCP port probe
        test = s["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "deploy/healthcheck.py"]
        assert test[test.index("--port") + 1] == flag("--port")
        # ...for the default model by its health name, so "up but serving nothing" is unhealthy
        default_model = compose_defaults()["SEQSERVE_DEFAULT_MODEL"]
        assert test[test.index("--service") + 1] == f"seqserve.v1.Inference/{default_model}"
        assert not any(tool in " ".join(test) for tool in ("nc ", "curl", "wget", "/dev/tcp"))
        # SIGTERM, then enough time for in-flight RPCs plus the snapshot before SIGKILL
        assert s.get("stop_signal", "SIGTERM") == "SIGTERM"
        grace_s = float(s["environment"]["SEQSERVE_GRACE_S"])
        assert duration_s(s["stop_grace_period"]) >= grace_s + 30
    assert services["server"]["volumes"] != services["server-gpu"]["volumes"], "replicas must not share state"

    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["command"][gpu["command"].index("--device") + 1] == "cuda"

    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])


def test_prometheus_scrapes_the_servers_metrics_port():
    doc = load_compose()
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "seqserve")
    targets = {(name, sd["port"]) for sd in job["dns_sd_configs"] for name in sd["names"]}
    for name in ("server", "server-gpu"):
        cmd = doc["services"][name]["command"]
        assert (name, int(cmd[cmd.index("--metrics-port") + 1])) in targets


def test_server_command_and_environment_are_valid_server_settings():
    # the compose file speaks serving/settings.py's language: its flags and SEQSERVE_* names
    import dataclasses

    from serving import settings

    known = {"SEQSERVE_" + f.name.upper() for f in dataclasses.fields(settings.Settings)}
    for name in ("server", "server-gpu"):
        spec = load_compose()["services"][name]
        env = {k: str(v) for k, v in spec["environment"].items()}
        assert set(env) <= known, f"{name}: unknown server settings {set(env) - known}"
        got = settings.from_args(spec["command"][2:], env=env)  # raises on an unknown flag or bad value
        assert (got.repo, got.state_dir, got.port, got.metrics_port) == ("/models", "/state", 50051, 8002)
        assert got.grace_s == float(compose_defaults()["SEQSERVE_GRACE_S"])
