"""The one server launcher (bench.common.start_serving / ChildServer): what reaches the child's environment."""

from __future__ import annotations

import os

import tritonclient.grpc as tc
from server_process import start_server

from bench.common import child_env, free_port


def test_child_env_drops_the_callers_server_settings(monkeypatch):
    monkeypatch.setenv("SERVING_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/not-for-children")
    env = child_env()
    assert not [k for k in env if k.startswith("SERVING_")] and "PROMETHEUS_MULTIPROC_DIR" not in env
    monkeypatch.setenv("SOME_TOOL_HOME", "/opt/tool")
    env = child_env()
    assert env["PATH"] == os.environ["PATH"] and env["SOME_TOOL_HOME"] == "/opt/tool"  # the rest passes through
    assert child_env({"SERVING_MAX_BATCH_SIZE": "5"})["SERVING_MAX_BATCH_SIZE"] == "5"  # unless asked for


def test_a_developers_shell_does_not_change_the_server_under_test(trained_repository, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVING_MAX_BATCH_SIZE", "3")  # left over in someone's shell
    server = start_server(trained_repository, tmp_path, "--metrics-port", "0", env={"SERVING_MAX_QUEUE_DELAY_US": "7"})
    try:
        client = tc.InferenceServerClient(server.url)
        config = client.get_model_config("mnist").config
        client.close()
        assert config.max_batch_size == 1024  # the default, not the shell's 3
        assert config.dynamic_batching.max_queue_delay_microseconds == 7  # what the test asked for
    finally:
        assert server.stop() == 0, server.log()


def test_free_port_never_hands_out_a_port_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
