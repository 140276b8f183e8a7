"""The settings table: one source for flags, variables, ranges and the library's defaults."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from chatstream import cli, envvars
from chatstream.settings import TABLE, Settings, library_default


def test_every_flag_has_its_variable_and_every_variable_is_read():
    assert len({s.env for s in TABLE}) == len(TABLE)
    assert {s.env for s in TABLE} <= {v for k, v in vars(envvars).items() if k.isupper()}
    special = {"device": "cpu", "session_store": "memory"}
    for setting in TABLE:
        value = special.get(setting.name, "x")
        if setting.choices:
            value = str(setting.choices[-1]) if setting.name != "session_store" else "memory"
        elif setting.type in (int, float):
            value = str(int(setting.minimum or 0) + 1)
        settings = Settings.from_env({setting.env: value})
        assert getattr(settings, setting.name) == setting.type(value), setting.name


def test_flags_win_over_variables_and_ranges_are_checked():
    assert Settings.from_env({envvars.MAX_CONCURRENT: "3"}, max_concurrent=5).max_concurrent == 5
    assert Settings.from_env({envvars.TEMPERATURE: "0.2", envvars.TOP_P: "0.5"}).temperature == 0.2
    for env, raw in [(envvars.CONTEXT_LENGTH, "15"), (envvars.MAX_CONCURRENT, "0"), (envvars.TOP_P, "0"),
                     (envvars.PORT, "70000"), (envvars.DTYPE, "int8"), (envvars.MAX_QUEUE, "many")]:
        with pytest.raises(SystemExit, match=env):
            Settings.from_env({env: raw})


def test_library_defaults_come_from_the_table():
    from chatstream import ChatStream
    signature = inspect.signature(ChatStream.__init__).parameters
    for setting in TABLE:
        if setting.library:
            assert signature[setting.library].default == library_default(setting.library), setting.library
    # The original library's defaults are kept where it had them.
    assert library_default("num_of_concurrent_executions") == 2 and library_default("max_queue_size") == 5


def test_help_lists_every_flag_without_loading_torch():
    code = ("import sys; from chatstream import cli\n"
            "try: cli.main(['serve', '--help'])\nexcept SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("NO-TORCH")
    for setting in TABLE:
        assert setting.flag in out and setting.env in out


def test_bad_setting_exits_with_the_reason(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(envvars.TERMINATION_LOG, str(tmp_path / "log"))
    monkeypatch.setenv(envvars.CONTEXT_LENGTH, "8")
    assert cli.main(["serve"]) == 2
    assert "CHATSTREAM_CONTEXT_LENGTH" in (tmp_path / "log").read_text()
