"""Config errors name the field one way (issue 12, item 3); ``gateway check-config``; the
reload's key bookkeeping (Authenticator.replace); CLI papercuts (item 7)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from gateway import app
from gateway.auth import Authenticator, KeyEntry
from gateway.cli import build_parser, config_from_args, main
from gateway.config import Config, dump_config, parse_config, validate
from gateway.errors import ConfigError

KEY = "db-UNITKEY00000000000000000000AB"
KEY2 = "db-UNITKEY00000000000000000000CD"


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(parse_config(text, "gw.toml"))
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "metric_port = 9313\n",
            "gw.toml: metric_port: unknown field (did you mean metrics_port?)",
        ),
        ("[limits]\nmax_symbol = 5\n", "gw.toml: limits.max_symbol: unknown field (did you mean"),
        (
            f'[[api_keys]]\nkey = "{KEY}"\nmax_session = 2\n',
            "gw.toml: api_keys[0].max_session: unknown field (did you mean max_sessions?)",
        ),
        ("[strobe]\nfrobnicate = 1\n", "gw.toml: strobe.frobnicate: unknown field"),
        ("port = 70000\n", "gw.toml: port: Expected int <= 65535"),
        ("metrics_port = -1\n", "gw.toml: metrics_port: Expected int >= 0"),
        ("zstd_level = 0\n", "gw.toml: zstd_level: Expected int >= 1"),
        ("default_heartbeat_s = 60\n", "gw.toml: default_heartbeat_s: Expected int <= 30"),
        ("[limits]\nmax_symbols = 0\n", "gw.toml: limits.max_symbols: Expected int >= 1"),
        (
            "[limits]\nmax_line_bytes = 1024\n",
            "gw.toml: limits.max_line_bytes: Expected int >= 65536",
        ),
        (
            "[limits]\nstart_timeout_s = inf\n",
            "gw.toml: limits.start_timeout_s: Expected float <= ",
        ),
        (
            "[limits]\nhandshake_timeout_s = 0\n",
            "gw.toml: limits.handshake_timeout_s: Expected float > 0",
        ),
        (
            f'[[api_keys]]\nkey = "{KEY}"\nmax_sessions = 0\n',
            "gw.toml: api_keys[0].max_sessions: Expected int >= 1",
        ),
        ("[strobe]\ninterval_s = 0\n", "gw.toml: strobe.interval_s: Expected float > 0"),
        ("feed_grace_s = -1\n", "gw.toml: feed_grace_s: Expected float >= 0"),
        ('port = "x"\n', "gw.toml: port: Expected int, got str"),
        ('[journal]\nfsync = "always"\n', "gw.toml: journal.fsync: Invalid enum value 'always'"),
        ("[journal]\nretention_s = 0\n", "gw.toml: journal.retention_s: Expected float > 0"),
        ("[journal]\nmax_bytes = 4096\n", "gw.toml: journal.max_bytes: Expected int >= 1048576"),
        ("[journal]\nmax_replays = 0\n", "gw.toml: journal.max_replays: Expected int >= 1"),
        (
            "[journal]\nfsync_interval_s = 0\n",
            "gw.toml: journal.fsync_interval_s: Expected float > 0",
        ),
        (
            "[journal]\nsegment_bytes = 100\n",
            "gw.toml: journal.segment_bytes: Expected int >= 65536",
        ),
        (
            "[journal]\nreplay_step_bytes = 1\n",
            "gw.toml: journal.replay_step_bytes: Expected int >= 4096",
        ),
        ("[journal]\ndir = 5\n", "gw.toml: journal.dir: Expected str | null, got int"),
        ('[journal]\ndirectory = "/x"\n', "gw.toml: journal.directory: unknown field"),
        ('[journal]\ndir = ""\n', "journal.dir: empty path"),
        (
            "[journal]\nsegment_bytes = 2097152\nmax_bytes = 1048576\n",
            "journal: need segment_bytes <= max_bytes",
        ),
    ],
)
def test_errors_name_the_field(text: str, message: str) -> None:
    assert _error(text).startswith(message)


def test_cli_overrides_are_held_to_the_same_ranges() -> None:
    for argv, message in [
        (["--port", "70000"], "port: Expected int <= 65535"),
        (["--metrics-port", "65536"], "metrics_port: Expected int <= 65535"),
        (["--heartbeat-interval", "3"], "default_heartbeat_s: Expected int >= 5"),
    ]:
        args = build_parser().parse_args(["serve", "--api-key", KEY, *argv])
        with pytest.raises(ConfigError, match="^" + message):
            config_from_args(args)


def test_cross_field_checks_remain() -> None:
    assert _error("[slow_reader]\nwrite_low_water = 9\nwrite_high_water = 8\n").startswith(
        "slow_reader: need write_low_water <= write_high_water"
    )
    text = f'[[api_keys]]\nkey = "{KEY}"\n[[api_keys]]\nkey = "{KEY}"\n'
    assert _error(text) == "api_keys[1].key: duplicate key"
    assert KEY not in _error('[[api_keys]]\nkey = "db-3kX9p0000000000000000000000000"\n')


def test_dump_config_masks_keys_and_round_trips() -> None:
    text = (
        f'[[api_keys]]\nkey = "{KEY}"\nname = "alice"\ndatasets = ["A.B"]\n'
        f'[[api_keys]]\nkey = "{KEY2}"\n[feeds]\n"A.B" = "synthetic:?rate=5"\n'
        f'[strobe]\nkey = "{KEY2}"\n[limits]\nmax_symbols = 7\n'
    )
    cfg = validate(parse_config(text))
    out = dump_config(cfg)
    assert KEY not in out and KEY2 not in out and KEY[:-5] not in out
    assert '"***************************000AB"' in out
    again = parse_config(out)  # valid TOML, the same config but for the masked keys
    assert again.limits.max_symbols == 7 and again.feeds == {"A.B": "synthetic:?rate=5"}
    assert [k.name for k in again.api_keys] == ["alice", None]
    doc = json.loads(dump_config(cfg, "json"))
    assert doc["api_keys"][0]["key"].endswith("000AB") and KEY not in json.dumps(doc)
    assert doc["strobe"]["key"] != KEY2
    assert parse_config(dump_config(Config())) == Config()


def test_check_config_prints_the_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(f'port = 13001\n[[api_keys]]\nkey = "{KEY}"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "port = 13001" in out and "[limits]" in out and "max_symbols = 100000" in out
    assert KEY not in out
    assert main(["check-config", "--format", "json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["port"] == 13001 and doc["metrics_port"] is None


def test_check_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text("[limits]\nmax_symbols = 0\n")
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"gateway: error: {path}: limits.max_symbols: Expected int >= 1\n"
    assert main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_json_log_format_makes_fatal_errors_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('log_format = "json"\nmetric_port = 9313\n')
    assert main(["serve", "--config", str(path), "--api-key", KEY]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "error" and doc["msg"].endswith(
        "metric_port: unknown field (did you mean metrics_port?)"
    )
    assert main(["serve", "--log-format", "json", "--port", "99999", "--api-key", KEY]) == 2
    doc = json.loads(capsys.readouterr().err)
    assert doc["msg"] == "port: Expected int <= 65535"
    assert main(["serve", "--port", "99999", "--api-key", KEY]) == 2
    assert capsys.readouterr().err == "gateway: error: port: Expected int <= 65535\n"


def test_log_level_has_help_and_probe_help_shows_defaults() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = getattr(sub, "choices", {})
    serve_help = choices["serve"].format_help()
    assert "--log-level {debug,info,warning,error}\n" in serve_help
    assert "least severe log lines" in " ".join(serve_help.split())
    probe_help = " ".join(choices["probe"].format_help().split())
    assert "(default: 13000)" in probe_help


def _entry(key: str, datasets: frozenset[str] | None = None, n: int = 10) -> KeyEntry:
    return KeyEntry(key=key, key_id=f"key-{key[-5:]}", datasets=datasets, max_sessions=n)


def test_authenticator_replace_keeps_entries_and_returns_the_revoked() -> None:
    a, b = _entry(KEY), _entry(KEY2)
    auth = Authenticator([a, b])
    auth.acquire(a, "A.B", {"A.B"})
    third = "db-UNITKEY00000000000000000000EF"
    added, revoked = auth.replace([_entry(KEY, frozenset({"C.D"}), 1), _entry(third)])
    assert revoked == [b] and [e.key for e in added] == [third]
    kept = next(e for e in auth.entries if e.key == KEY)
    assert kept is a and a.active == 1 and a.max_sessions == 1 and not a.allows("A.B")
    from gateway.auth import cram_response

    with pytest.raises(Exception, match="Authentication failed"):
        auth.check("c" * 32, cram_response("c" * 32, KEY2))
    assert auth.check("c" * 32, cram_response("c" * 32, third)).key == third


def test_reload_diff_names_only_the_fields_that_need_a_restart() -> None:
    old = msgspec.to_builtins(Config())
    new = msgspec.to_builtins(
        parse_config(
            f'zstd_level = 3\n[[api_keys]]\nkey = "{KEY}"\n[limits]\nmax_symbols = 2\n'
            "[transport]\nsndbuf = 65536\n"
        )
    )
    changed = app._changed_fields(old, new, skip=("api_keys", "limits"))
    assert changed == ["transport.sndbuf", "zstd_level"]


def test_probe_fatal_error_is_json_in_json_mode(tmp_path: Path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "no-such-key-file"
    res = subprocess.run(
        [sys.executable, "-m", "gateway", "probe", "--dataset", "X", "--once"]
        + ["--log-format", "json", "--key-file", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert lines and all(json.loads(line)["level"] for line in lines), res.stderr
    assert "--key-file" in json.loads(lines[-1])["msg"]


def test_journal_section_defaults_and_values() -> None:
    default = Config().journal
    assert default.dir is None  # no journal unless configured
    assert (default.retention_s, default.max_bytes, default.fsync) == (86_400.0, 8 << 30, "never")
    assert (default.fsync_interval_s, default.max_replays) == (1.0, 16)
    assert (default.segment_bytes, default.replay_step_bytes) == (256 << 20, 1 << 20)
    cfg = validate(
        parse_config(
            '[journal]\ndir = "/var/lib/gateway/journal"\nretention_s = 3600\n'
            'max_bytes = 1073741824\nfsync = "interval"\nfsync_interval_s = 0.5\n'
            "max_replays = 4\nsegment_bytes = 16777216\nreplay_step_bytes = 65536\n"
        )
    )
    j = cfg.journal
    assert j.dir == "/var/lib/gateway/journal"
    assert (j.retention_s, j.max_bytes, j.fsync, j.fsync_interval_s) == (
        3600.0,
        1 << 30,
        "interval",
        0.5,
    )
    assert (j.max_replays, j.segment_bytes, j.replay_step_bytes) == (4, 16 << 20, 65536)
    assert parse_config(dump_config(cfg)).journal == j
