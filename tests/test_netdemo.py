"""The network command-line pieces: halves, tokens, server construction."""

import keras
import numpy as np
import pytest

from keras_split.apps import cli, netdemo
from keras_split.apps.demo import build_demo_cnn


def test_saved_halves_compose_to_the_demo_model(tmp_path):
    client_path, server_path = netdemo.save_halves(tmp_path)
    client = keras.models.load_model(client_path)
    server = keras.models.load_model(server_path)
    keras.utils.set_random_seed(0)
    model = build_demo_cnn()  # same seed, same initial weights as save_halves
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype("uint8")
    np.testing.assert_allclose(server(client(x)), model(x), atol=1e-5)


def test_token_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# clients\nabc hospital-a\n\nxyz hospital-b\n")
    assert netdemo.read_tokens(path) == {"abc": "hospital-a", "xyz": "hospital-b"}
    path.write_text("abc hospital a\n")
    with pytest.raises(ValueError, match=r"tokens.txt:1: expected 'TOKEN CLIENT_ID', received 3"):
        netdemo.read_tokens(path)


def test_serve_from_logits_needs_a_logits_loss(tmp_path):
    _, server_path = netdemo.save_halves(tmp_path)
    with pytest.raises(ValueError, match=r"--from-logits needs a loss class"):
        netdemo.make_server(server_path, "mse", True, "adam", 1e-3, None,
                            tokens={"t": "a"}, insecure=True)
    server = netdemo.make_server(server_path, "sparse_categorical_crossentropy", True, "adam",
                                 1e-3, ["accuracy"], tokens={"t": "a"}, insecure=True)
    server.stop()


def test_serve_without_tls_material_is_a_clear_cli_error(tmp_path, capsys):
    _, server_path = netdemo.save_halves(tmp_path)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("t a\n")
    code = cli.main(["serve", "--model", str(server_path), "--token-file", str(tokens)])
    assert code == 2
    assert "TLS is on by default" in capsys.readouterr().err


def test_serve_with_rounds_builds_a_coordinator(tmp_path, capsys):
    from keras_split.configurations.rounds import PerClientRole

    client_path, server_path = netdemo.save_halves(tmp_path)
    options = {"mode": "sflv1", "rounds": 2, "clients": 3, "turn_timeout": 5.0,
               "client_model": client_path}
    server = netdemo.make_server(server_path, "sparse_categorical_crossentropy", True, "adam",
                                 1e-3, None, rounds=options, tokens={"t": "a"}, insecure=True)
    try:
        assert server.coordinator.mode == "splitfed" and server.coordinator.expected == 3
        assert isinstance(server.role, PerClientRole) and server.coordinator.server is server.role
        assert len(server.coordinator.weights) == len(keras.models.load_model(
            client_path).get_weights())
    finally:
        server.stop()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("t a\n")
    code = cli.main(["serve", "--model", str(server_path), "--token-file", str(tokens),
                     "--insecure", "--rounds", "2"])
    assert code == 2 and "--rounds needs --client-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["client", "--model", "m", "--server", "s", "--shard", "two"])
    assert "expected I/K (e.g. 0/3), received 'two'" in capsys.readouterr().err


def test_only_a_rounds_server_waits_for_its_rounds(tmp_path):
    _, server_path = netdemo.save_halves(tmp_path)
    server = netdemo.make_server(server_path, "sparse_categorical_crossentropy", True, "adam",
                                 1e-3, None, tokens={"t": "a"}, insecure=True)
    try:
        with pytest.raises(ValueError, match=r"`wait_for_rounds` needs a server that runs "
                                             r"rounds: pass `coordinator="):
            server.wait_for_rounds()
    finally:
        server.stop()


def test_client_data_defaults_to_the_shipped_xrays_and_says_so():
    lines = []
    (x, y), (x_val, _), (x_test, _) = netdemo.load_data(None, lines.append)[0]
    assert (len(x), len(x_val), len(x_test)) == (2428, 270, 468)
    assert lines == ["data: the shipped balanced PneumoniaMNIST subset (2,428 train / 270 val "
                     "/ 468 test chest X-rays); pass --data FILE.npz for your own"]
