"""MLflow as the user sees it: a real `mlflow server` (cluster/mlflow_server.sh, sqlite + local artifact store)
on a loopback port, written to over HTTP by training and read back through the REST client."""

import socket

import pytest

from mlflow_server import mlflow_server  # noqa: F401  (the fixture)


@pytest.mark.slow
def test_server_answers_the_names_nodes_use_and_refuses_others(mlflow_server):  # noqa: F811
    # nodes reach the server by its host name; MLflow refuses Host headers it was not told about (DNS rebinding)
    assert mlflow_server.answers(host=f"{socket.gethostname()}:{mlflow_server.port}")
    assert mlflow_server.answers(host=f"10.1.2.3:{mlflow_server.port}")
    assert not mlflow_server.answers(host=f"attacker.example.com:{mlflow_server.port}")
