"""The client protects its API key and can present a certificate (mutual TLS).

Refusals are checked when a client is built, before any call: channels connect lazily, so a refused
non-loopback target is never contacted. Servers run on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from helpers import ServerThread

from embedforge.client import AsyncEmbedClient, EmbedClient, InsecureKeyError
from embedforge.loadtest.command import loadtest_command
from embedforge.net import check_key_transport, is_loopback, target_hosts
from embedforge.server.cli import embed_command, health_command

REMOTE_TARGETS = ["10.1.2.3:50051", "embedforge.example:443", "dns:///embedforge.default.svc.cluster.local:50051",
                  "127.0.0.1:50051,10.1.2.3:50051", "ipv4:127.0.0.1:1,192.168.1.9:2", "http://10.1.2.3:8080/"]
LOCAL_TARGETS = ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1,localhost:2",
                 "ipv6:[::1]:50051", "dns:///localhost:50051", "unix:/tmp/embedforge.sock", "http://127.0.0.1:8080"]


@pytest.mark.parametrize(("target", "hosts"), [
    ("10.1.2.3:50051", ["10.1.2.3"]),
    ("[::1]:50051", ["::1"]),
    ("a.example:1, b.example:2", ["a.example", "b.example"]),
    ("dns:///svc.ns.svc.cluster.local:50051", ["svc.ns.svc.cluster.local"]),
    ("dns://8.8.8.8/svc.example:50051", ["svc.example"]),
    ("ipv4:127.0.0.1:1,10.0.0.1:2", ["127.0.0.1", "10.0.0.1"]),
    ("ipv6:[::1]:1,[fe80::1]:2", ["::1", "fe80::1"]),
    ("https://api.example:8443/v1", ["api.example"]),
    ("unix:/run/embedforge.sock", []),
])
def test_target_hosts(target, hosts):
    assert target_hosts(target) == hosts


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.com", "::", "localhost.example"))


@pytest.mark.parametrize("target", REMOTE_TARGETS)
def test_a_key_is_never_sent_in_clear_text_beyond_loopback(target):
    with pytest.raises(InsecureKeyError, match="clear text"):
        check_key_transport(target, has_key=True, tls=False)
    check_key_transport(target, has_key=True, tls=True)
    check_key_transport(target, has_key=True, tls=False, allow_insecure_key=True)
    check_key_transport(target, has_key=False, tls=False)
    if not target.startswith("http"):
        with pytest.raises(InsecureKeyError):
            EmbedClient(target, api_key="s3cret")


@pytest.mark.parametrize("target", LOCAL_TARGETS)
def test_loopback_targets_may_take_a_key_without_tls(target):
    check_key_transport(target, has_key=True, tls=False)


def test_clients_built_for_a_remote_target_without_a_key_or_with_tls_or_consent():
    # Built only: channels connect lazily, and nothing here calls them.
    for client in (EmbedClient("10.1.2.3:50051"), EmbedClient("10.1.2.3:50051", api_key="k", allow_insecure_key=True),
                   EmbedClient("10.1.2.3:50051", api_key="k", tls_root_cert=b"not checked until a call")):
        client.close()


def test_the_async_client_refuses_too():
    async def build() -> None:
        AsyncEmbedClient("10.1.2.3:50051", api_key="s3cret")

    with pytest.raises(InsecureKeyError):
        asyncio.run(build())


def test_a_client_certificate_needs_its_key(tmp_path):
    cert = tmp_path / "client.pem"
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        EmbedClient("127.0.0.1:1", tls_cert=cert)


@pytest.mark.parametrize("args", [
    ["--target", "10.1.2.3:50051", "some text"],
    ["--target", "dns:///embedforge.default.svc.cluster.local:50051", "some text"],
])
def test_embed_command_refuses_to_send_the_key_in_clear_text(args, monkeypatch):
    monkeypatch.setenv("EMBEDFORGE_API_KEY", "s3cret")
    result = CliRunner().invoke(embed_command, args)
    assert result.exit_code != 0 and "clear text" in result.output and "--allow-insecure-key" in result.output
    assert "s3cret" not in result.output


@pytest.mark.parametrize("target", ["10.1.2.3:50051", "http://10.1.2.3:8080"])
def test_loadtest_refuses_to_send_the_key_in_clear_text(target, monkeypatch):
    monkeypatch.setenv("LOADTEST_KEY", "s3cret")
    result = CliRunner().invoke(loadtest_command, ["--target", target, "--api-key-env", "LOADTEST_KEY",
                                                   "--requests", "1"])
    assert result.exit_code == 2 and "clear text" in result.output


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: as in a pod, it serves TLS and is the probe's client
    certificate (the server takes client certificates signed by it)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_mutual_tls_client_health_and_loadtest(embedder, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    with ServerThread(embedder, tls_cert=cert, tls_key=key, tls_client_ca=cert, api_key="s3cret",
                      http_port=0) as running:
        with EmbedClient(running.target, timeout=10, api_key="s3cret", tls_root_cert=cert, tls_cert=cert,
                         tls_key=key) as client:
            assert client.embed(["hello"]).vectors.shape[0] == 1
        with EmbedClient(running.target, timeout=3, api_key="s3cret", tls_root_cert=cert) as no_cert:
            with pytest.raises(grpc.RpcError) as refused:
                no_cert.info()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        tls = ["--tls-root-cert", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
        healthy = CliRunner().invoke(health_command, ["--target", running.target, *tls])
        assert healthy.exit_code == 0 and healthy.output.strip().endswith("SERVING"), healthy.output
        without = CliRunner().invoke(health_command, ["--target", running.target, *tls[:2]])
        assert without.exit_code == 1 and "UNAVAILABLE" in without.output
        half = CliRunner().invoke(health_command, ["--target", running.target, *tls[:4]])
        assert half.exit_code == 2 and "--tls-key" in half.output
        # A container's HEALTHCHECK runs the plain command: the files come from the environment.
        env = {"EMBEDFORGE_TLS_ROOT_CERT": str(cert), "EMBEDFORGE_TLS_CERT": str(cert), "EMBEDFORGE_TLS_KEY": str(key)}
        from_env = CliRunner().invoke(health_command, ["--target", running.target], env=env)
        assert from_env.exit_code == 0 and "SERVING" in from_env.output, from_env.output
        monkeypatch.setenv("LOADTEST_KEY", "s3cret")
        for target in (running.target, f"https://127.0.0.1:{running.server.http.port}"):
            report = tmp_path / "report.json"
            load = CliRunner().invoke(loadtest_command, ["--target", target, "--api-key-env", "LOADTEST_KEY", *tls,
                                                         "--requests", "3", "--warmup", "0", "--output", str(report)])
            assert load.exit_code == 0, load.output
            summary = json.loads(report.read_text())
            assert summary["ok"] == 3 and summary["config"]["client_cert"] is True
