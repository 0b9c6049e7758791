"""wandb never blocks a run: an unreachable server (a fake endpoint on 127.0.0.1: silent, failing or closed) makes
the run log offline within seconds, saying so in one line; a failing online start falls back offline; a resumed
run continues its wandb run (same id). No test reaches the real network."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, compose

from dlm import tracking
from dlm.tracking import existing_run_id, make_wandb_logger, probe_wandb_server


@pytest.fixture
def fake_wandb():
    """fake_wandb(kind) -> base URL of a local endpoint: "silent" accepts and never answers, "500" answers
    HTTP 500 to everything, "closed" is a port nobody listens on."""
    cleanup = []

    def make(kind: str) -> str:
        if kind == "silent":
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)  # connections complete in the backlog; nothing ever reads or answers them
            cleanup.append(sock.close)
            return f"http://127.0.0.1:{sock.getsockname()[1]}"
        if kind == "500":
            class Failing(http.server.BaseHTTPRequestHandler):
                def _fail(self):
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    self.send_response(500)
                    self.end_headers()

                do_GET = do_POST = _fail

                def log_message(self, *args):
                    pass

            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            cleanup.append(server.shutdown)
            return f"http://127.0.0.1:{server.server_address[1]}"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return f"http://127.0.0.1:{port}"

    yield make
    for close in cleanup:
        close()


@pytest.fixture
def online_env(monkeypatch, fake_wandb):
    """Credentials present, the server at a fake endpoint: what a run sees with WANDB_API_KEY and no network."""

    def make(kind: str, wandb_mode: str | None = None) -> str:
        url = fake_wandb(kind)
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", url)
        if wandb_mode is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", wandb_mode)
        return url

    return make


@pytest.mark.parametrize("kind", ["silent", "500", "closed"])
def test_probe_says_why_an_unreachable_server_is_unreachable_within_its_timeout(fake_wandb, kind):
    started = time.perf_counter()
    problem = probe_wandb_server(fake_wandb(kind), timeout=1.0)
    assert time.perf_counter() - started < 3
    expected = {"silent": "no answer within 1 s", "500": "HTTP 500", "closed": "ConnectionRefusedError"}[kind]
    assert problem is not None and expected in problem


def test_probe_accepts_any_answer_below_500(monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert probe_wandb_server(f"http://127.0.0.1:{server.server_address[1]}", timeout=2) is None
    finally:
        server.shutdown()


@pytest.mark.parametrize(("kind", "wandb_mode"), [("silent", "online"), ("closed", None)])
def test_unreachable_server_logs_offline_within_seconds_and_says_so(tmp_path, online_env, monkeypatch, capsys, kind,
                                                                     wandb_mode):
    import wandb

    url = online_env(kind, wandb_mode)
    real_init, starts = wandb.init, []

    def init(**kwargs):  # when wandb is started, and how: the decision is dlm's, the offline start wandb's own
        starts.append((time.perf_counter(), kwargs.get("mode")))
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = make_wandb_logger(save_dir=str(tmp_path / "run"))
    started = time.perf_counter()
    experiment = logger.experiment
    try:
        assert experiment.settings.mode == "offline"
        ((when, mode),) = starts  # never tried online
        assert mode == "offline" and when - started < 6, f"offline chosen after {when - started:.1f} s"
    finally:
        experiment.finish()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wandb: offline")]
    assert len(lines) == 1, lines
    assert f"{url} unreachable" in lines[0]
    assert f"wandb sync --id {experiment.id} {tmp_path / 'run'}/wandb/offline-run-*" in lines[0]
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{experiment.id}"))


def test_failing_online_start_falls_back_offline(tmp_path, online_env, monkeypatch, capsys):
    import wandb
    from wandb.errors import CommError

    online_env("silent", "online")
    monkeypatch.setattr(tracking, "probe_wandb_server", lambda *a, **k: None)  # the server seemed fine...
    real_init = wandb.init
    modes = []

    def init(**kwargs):
        modes.append(kwargs.get("mode"))
        if kwargs.get("mode") == "online":  # ...but the online start fails, as wandb's init_timeout does
            raise CommError("Run initialization has timed out after 30.0 sec.")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = make_wandb_logger(save_dir=str(tmp_path / "run"))
    experiment = logger.experiment
    try:
        assert modes == ["online", "offline"] and experiment.settings.mode == "offline"
    finally:
        experiment.finish()
    out = capsys.readouterr().out
    assert "wandb: offline (online start failed: CommError: Run initialization has timed out" in out


def test_logger_continues_the_wandb_run_of_its_folder(tmp_path):
    first = make_wandb_logger(save_dir=str(tmp_path / "a")).experiment
    first.finish()
    again = make_wandb_logger(save_dir=str(tmp_path / "a")).experiment
    again.finish()
    other = make_wandb_logger(save_dir=str(tmp_path / "b")).experiment
    other.finish()
    assert again.id == first.id != other.id
    assert (tmp_path / "a" / "wandb" / "run_id").read_text().strip() == first.id


def test_run_id_is_read_from_wandb_folder_names_without_dlm_record(tmp_path):
    (tmp_path / "wandb" / "offline-run-20250101_000000-aaaa1111").mkdir(parents=True)
    (tmp_path / "wandb" / "offline-run-20250102_000000-bbbb2222").mkdir()
    assert existing_run_id(tmp_path) == "bbbb2222"
    assert existing_run_id(tmp_path / "nothing") is None


def _cfg(tmp_path: Path, run_dir: Path, *overrides: str):
    fast = [o for o in FAST if o != "logger=none"]
    return compose(fast + ["logger=default", f"paths.run_dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                           "name=test", "trainer.max_steps=3", "samples.num_prompted=0", "samples.num_infill=0",
                           "samples.num_unconditional=2", *overrides])


def test_resumed_training_continues_the_same_wandb_run(tmp_path):
    from dlm.train import train

    run_dir = train(_cfg(tmp_path, tmp_path / "run"))
    run_id = existing_run_id(run_dir)
    assert run_id
    train(_cfg(tmp_path, run_dir, "trainer.max_steps=6", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"))
    assert existing_run_id(run_dir) == run_id
    # both starts logged under the one run id: a folder per start (wandb adds -1 when both began in one second)
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", f.name) for f in folders), folders
    other = train(_cfg(tmp_path, tmp_path / "other"))
    assert existing_run_id(other) not in (None, run_id)


def test_probed_server_is_the_one_wandb_will_use(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings").write_text("[default]\nbase_url = http://127.0.0.1:9/\n")  # wandb login --host
    assert tracking.wandb_base_url() == "http://127.0.0.1:9"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:10")
    assert tracking.wandb_base_url() == "http://127.0.0.1:10"


def test_online_without_credentials_is_offline_and_says_why(tmp_path, monkeypatch, fake_wandb):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", fake_wandb("closed"))
    monkeypatch.setenv("WANDB_MODE", "online")
    mode, reason = tracking.choose_wandb_mode("auto")
    assert mode == "offline" and "no credentials found" in reason
    # `wandb login` stores the key in ~/.netrc under the server's host (api.wandb.ai, or a --host server)
    (tmp_path / "netrc").write_text("machine 127.0.0.1\n  login user\n  password " + "0" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert tracking.wandb_credentials_present()
    mode, reason = tracking.choose_wandb_mode("auto")
    assert mode == "offline" and "unreachable" in reason  # credentials, but the (closed) server does not answer
