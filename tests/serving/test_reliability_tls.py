"""TLS and mutual TLS on the gRPC port, with certificates made here by the openssl CLI."""
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.client import Client

MODEL, F = "lstm", 3


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    _leaf(d, "client", "ca", "DNS:client")
    _leaf(d, "intruder", "other-ca", "DNS:intruder")
    return d


def _step_ok(client):
    y, pos = client.step(MODEL, "tls-1", np.ones(F, np.float32), start=True)
    assert y.shape == (1, 3) and pos == 1


def _refused(client):
    with pytest.raises(grpc.RpcError) as err:
        client.step(MODEL, "tls-x", np.ones(F, np.float32), start=True)
    return err.value.code()


def test_tls(pki, model_repo, kit):
    running = kit.start_server(repo=str(model_repo), tls_cert=str(pki / "server.pem"),
                               tls_key=str(pki / "server.key"))
    try:
        with Client(running.target, tls_ca=str(pki / "ca.pem")) as c:
            _step_ok(c)
        with Client(running.target, timeout=5) as plain:  # plaintext to a TLS port
            assert _refused(plain) == grpc.StatusCode.UNAVAILABLE
        with Client(running.target, timeout=5, tls_ca=str(pki / "other-ca.pem")) as wrong:
            assert _refused(wrong) == grpc.StatusCode.UNAVAILABLE  # server not trusted
    finally:
        running.stop()


def test_mutual_tls_with_token_and_cli(pki, model_repo, kit, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-m": "mtls-tenant"}))
    running = kit.start_server(repo=str(model_repo), tls_cert=str(pki / "server.pem"),
                               tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"),
                               auth_tokens=str(tokens))
    ca = str(pki / "ca.pem")
    try:
        mine = dict(tls_ca=ca, tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
        with Client(running.target, token="tok-m", **mine) as c:
            _step_ok(c)
        with Client(running.target, timeout=5, tls_ca=ca, token="tok-m") as no_cert:
            assert _refused(no_cert) == grpc.StatusCode.UNAVAILABLE
        with Client(running.target, timeout=5, tls_ca=ca, token="tok-m",
                    tls_cert=str(pki / "intruder.pem"), tls_key=str(pki / "intruder.key")) as bad:
            assert _refused(bad) == grpc.StatusCode.UNAVAILABLE
        with Client(running.target, timeout=5, **mine) as no_token:  # TLS alone is not a tenant
            assert _refused(no_token) == grpc.StatusCode.UNAUTHENTICATED
        # the CLI over mutual TLS, token from SEQSERVE_TOKEN
        proc = subprocess.run(
            [sys.executable, "-m", "seqserve.cli", "stream", "--model", MODEL, "--target",
             running.target, "--tls-ca", ca, "--tls-cert", mine["tls_cert"], "--tls-key",
             mine["tls_key"]], input="0.1 0.2 0.3\n0.4 0.5 0.6\n", capture_output=True, text=True,
            timeout=60, env={**__import__("os").environ, "SEQSERVE_TOKEN": "tok-m"})
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip().splitlines()) == 2
        proc = subprocess.run(
            [sys.executable, "-m", "seqserve.cli", "stream", "--model", MODEL, "--target",
             running.target, "--tls-ca", ca, "--tls-cert", mine["tls_cert"], "--tls-key",
             mine["tls_key"], "--token", "wrong"], input="0.1 0.2 0.3\n", capture_output=True,
            text=True, timeout=60)
        assert proc.returncode != 0 and "UNAUTHENTICATED" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        running.stop()
