"""Production configuration: one strong secret shared by every API process and worker."""

import os
import stat

import pytest
from pydantic import ValidationError

from handler.backends import secret_key
from handler.settings import Settings


@pytest.mark.parametrize("secret", [None, "", "a", "s" * 32, "abababababababababababababababab", "short-but-varied-123"])
def test_production_refuses_a_missing_or_weak_secret(secret):
    with pytest.raises(ValidationError, match="strong secret shared by every API process and worker"):
        Settings(_env_file=None, env="production", secret_key=secret)


def test_production_takes_a_strong_secret_and_dev_makes_its_own(tmp_path):
    strong = "7f3a9c0e51b24d68a1e9f0c3b7d2e45a"
    assert secret_key(Settings(_env_file=None, env="production", secret_key=strong)) == strong.encode()
    dev = Settings(_env_file=None, data_dir=tmp_path)
    made = secret_key(dev)
    assert len(made) == 64 and secret_key(dev) == made  # kept, not made again
    assert stat.S_IMODE(os.stat(tmp_path / "secret-key").st_mode) == 0o600
