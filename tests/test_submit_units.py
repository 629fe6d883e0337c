"""What every job's runtime env carries, and what it must never carry."""

from __future__ import annotations

import pytest

from pipeline.submit import JobServer, job_env


@pytest.mark.parametrize("mode, expected", [("online", None), ("offline", "offline"),
                                            ("off", "disabled")])
def test_job_env_never_carries_the_wandb_key(monkeypatch, mode, expected):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    env = job_env({"tracking": {"wandb": mode}}, JobServer("http://127.0.0.1:1"))
    assert "WANDB_API_KEY" not in env
    assert not any("0123456789abcdef" in value for value in env.values())
    assert env.get("WANDB_MODE") == expected
    assert env["PYTHONUNBUFFERED"] == "1"
