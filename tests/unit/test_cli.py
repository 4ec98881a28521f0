"""The command line's key handling (key files, the probe's key sources) and the connect
help, without starting a gateway."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway import app
from gateway.cli import (
    DEMO_KEY,
    SERVE_FLAGS,
    Flag,
    build_parser,
    config_from_args,
    connect_help,
    main,
)
from gateway.config import read_key_file, resolve_probe_key
from gateway.errors import ConfigError

KEY_A = "db-AAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
KEY_B = "db-BBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_key_file_format(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys", f"# desk keys\n\n  {KEY_A}\t\n#{KEY_B}\n{KEY_B}")
    assert read_key_file(path, "--api-key-file") == [(3, KEY_A), (5, KEY_B)]
    crlf = _write(tmp_path / "crlf", f"{KEY_A}\r\n{KEY_B}\r\n".encode())
    assert [k for _, k in read_key_file(crlf, "--x")] == [KEY_A, KEY_B]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{KEY_A}\nshort-key\n", "--api-key-file {path} line 2: not an API key: must be 32"),
        (f"{KEY_A[:-1]}|\n", "--api-key-file {path} line 1: not an API key"),
        (f"{KEY_A} {KEY_B}\n", "--api-key-file {path} line 1: not an API key"),
        (f"#\n{KEY_A}\n{KEY_A}\n", "--api-key-file {path} line 3: duplicate key (same as line 2)"),
        ("# only comments\n\n   \n", "--api-key-file {path}: no API key in the file"),
        (b"db-\xc3\xa9AAAAAAAAAAAAAAAAAAAAAAAAAAA\n", "--api-key-file {path} line 1: not an API"),
    ],
)
def test_key_file_errors_name_flag_file_and_line_never_the_key(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = _write(tmp_path / "keys", text)
    with pytest.raises(ConfigError) as err:
        read_key_file(path, "--api-key-file")
    assert message.format(path=path) in str(err.value)
    for secret in (KEY_A, KEY_B, "short-key", KEY_A[:-1]):
        assert secret not in str(err.value)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--key-file .*missing: cannot read: No such file"):
        read_key_file(tmp_path / "missing", "--key-file")


def test_probe_key_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path / "key", f"# probe\n{KEY_B}\n")
    env = {"DATABENTO_API_KEY": DEMO_KEY}
    assert resolve_probe_key(KEY_A, str(path), env) == (KEY_A, "--key")
    assert resolve_probe_key(None, str(path), env) == (KEY_B, f"--key-file {path}")
    assert resolve_probe_key(None, None, env) == (DEMO_KEY, "DATABENTO_API_KEY")
    with pytest.raises(ConfigError, match="key: no API key given; use --key-file FILE or set"):
        resolve_probe_key(None, None, {"DATABENTO_API_KEY": ""})
    with pytest.raises(ConfigError) as err:
        resolve_probe_key("nope", None, env)
    assert str(err.value).startswith("--key: API keys are 32 printable ASCII characters")
    with pytest.raises(ConfigError) as err:
        resolve_probe_key(None, None, {"DATABENTO_API_KEY": "db-x"})
    assert str(err.value).startswith("DATABENTO_API_KEY: API keys are 32") and "db-x" not in str(
        err.value
    )


def test_probe_parser_needs_no_key_flag() -> None:
    args = build_parser().parse_args(["probe", "--dataset", "X.Y", "--once"])
    assert args.key is None and args.key_file is None


def test_serve_key_files_add_keys_for_every_dataset(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", f"{KEY_A}\n")
    b = _write(tmp_path / "b", f"# b\n{KEY_B}\n")
    args = build_parser().parse_args(["serve", "--api-key-file", str(a), "--api-key-file", str(b)])
    cfg = config_from_args(args)
    assert [(k.key, k.datasets, k.name) for k in cfg.api_keys] == [
        (KEY_A, ["*"], None),
        (KEY_B, ["*"], None),
    ]
    args = build_parser().parse_args(["serve", "--api-key", KEY_B, "--api-key-file", str(b)])
    with pytest.raises(ConfigError) as err:
        config_from_args(args)
    assert str(err.value).startswith(f"--api-key-file {b} line 2: duplicate key (already")
    assert KEY_B not in str(err.value)


def test_connect_help_shows_only_the_demo_key() -> None:
    args = build_parser().parse_args(["serve", "--api-key", DEMO_KEY, "--host", "0.0.0.0"])
    text = connect_help(config_from_args(args), 41234)
    assert f'db.Live(key="{DEMO_KEY}", gateway="127.0.0.1", port=41234)' in text
    assert "on 127.0.0.1:41234." in text
    args = build_parser().parse_args(["serve", "--api-key", KEY_A])
    text = connect_help(config_from_args(args), 5)
    assert KEY_A not in text and 'db.Live(key="<your API key>"' in text


def test_connect_help_is_printed_by_the_listening_hook(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is printed before the gateway listens; the hook prints the bound port."""
    seen: dict[str, Any] = {}

    def fake_run(cfg: Any, on_listening: Any = None, reload: Any = None) -> int:
        seen["printed_before"] = capsys.readouterr().out
        seen["hook"] = on_listening
        return 0

    monkeypatch.setattr(app, "run", fake_run)
    argv = ["serve", "--port", "0", "--api-key", DEMO_KEY, "--print-connect-help"]
    assert main(argv) == 0
    assert seen["printed_before"] == "" and seen["hook"] is not None
    seen["hook"](SimpleNamespace(port=40001))
    assert "port=40001)" in capsys.readouterr().out
    assert main(argv[:-1]) == 0
    assert seen["hook"] is None


#: a value for every overriding row of SERVE_FLAGS (argv after the flag, the field's value)
OVERRIDES: dict[str, tuple[list[str], Any]] = {
    "--host": (["0.0.0.0"], "0.0.0.0"),
    "--port": (["13001"], 13001),
    "--metrics-port": (["9313"], 9313),
    "--metrics-host": (["::1"], "::1"),
    "--loop": (["asyncio"], "asyncio"),
    "--log-format": (["json"], "json"),
    "--log-level": (["debug"], "debug"),
    "--heartbeat-interval": (["7"], 7),
    "--transport": (["vma"], "vma"),
    "--transport-profile": (["none"], "none"),
    "--env-file": (["/etc/gateway/onload.env"], "/etc/gateway/onload.env"),
    "--bypass-required": (["false"], False),
    "--sndbuf": (["262144"], 262144),
    "--rcvbuf": (["131072"], 131072),
    "--busy-poll-us": (["50"], 50),
    "--cpu-affinity": (["2,3"], [2, 3]),
    "--reuse-port": ([], True),
    "--strobe": ([], True),
    "--strobe-interval": (["2.5"], 2.5),
    "--strobe-history": (["/tmp/h.sqlite"], "/tmp/h.sqlite"),
    "--journal-dir": (["/var/lib/gateway/journal"], "/var/lib/gateway/journal"),
    "--journal-retention-s": (["3600"], 3600.0),
    "--journal-max-bytes": (["1073741824"], 1 << 30),
}


def _field(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("flag", [f for f in SERVE_FLAGS if f.path], ids=lambda f: f.name)
def test_each_serve_flag_row_overrides_its_config_field(flag: Flag) -> None:
    assert flag.path is not None and flag.name in OVERRIDES, "add the new row to OVERRIDES"
    argv, want = OVERRIDES[flag.name]
    default = config_from_args(build_parser().parse_args(["serve", "--api-key", KEY_A]))
    assert _field(default, flag.path) != want
    cfg = config_from_args(
        build_parser().parse_args(["serve", "--api-key", KEY_A, flag.name, *argv])
    )
    assert _field(cfg, flag.path) == want


def test_the_flag_table_is_the_serve_parser() -> None:
    assert set(OVERRIDES) == {f.name for f in SERVE_FLAGS if f.path}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = getattr(sub, "choices", {})["serve"]
    options = [a.option_strings[0] for a in serve._actions if a.option_strings][1:]  # less -h
    assert options == [f.name for f in SERVE_FLAGS]
    groups = {
        g.title: [a.option_strings[0] for a in g._group_actions] for g in serve._action_groups
    }
    assert groups["transport (see README: Kernel bypass)"][0] == "--transport"
    assert groups["uptime strobe (see README: Operating it)"] == [
        "--strobe",
        "--strobe-interval",
        "--strobe-history",
    ]


def test_a_bad_cpu_list_names_the_flag() -> None:
    args = build_parser().parse_args(["serve", "--api-key", KEY_A, "--cpu-affinity", "2,x"])
    with pytest.raises(ConfigError, match=r"^--cpu-affinity '2,x': expected CPU numbers"):
        config_from_args(args)


def test_journal_flags_are_one_group_and_held_to_the_config_ranges() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve = getattr(sub, "choices", {})["serve"]
    groups = {
        g.title: [a.option_strings[0] for a in g._group_actions] for g in serve._action_groups
    }
    assert groups["journal and replay (see README: Replay)"] == [
        "--journal-dir",
        "--journal-retention-s",
        "--journal-max-bytes",
    ]
    for argv, message in [
        (["--journal-retention-s", "0"], "journal.retention_s: Expected float > 0"),
        (["--journal-max-bytes", "1000"], "journal.max_bytes: Expected int >= 1048576"),
        (["--journal-dir", " "], "journal.dir: empty path"),
    ]:
        args = build_parser().parse_args(["serve", "--api-key", KEY_A, *argv])
        with pytest.raises(ConfigError, match="^" + message):
            config_from_args(args)


def test_no_journal_unless_asked() -> None:
    cfg = config_from_args(build_parser().parse_args(["serve", "--api-key", KEY_A]))
    assert cfg.journal.dir is None
