from pathlib import Path

from common.config import Settings, env_name, settings_table

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_settings_doc_is_generated_from_the_settings_class():
    """docs/SETTINGS.md is regenerated with `python docs/generate_settings.py`."""
    text = (DOCS / "SETTINGS.md").read_text()
    assert text.endswith(settings_table()), (
        "docs/SETTINGS.md is stale: run python docs/generate_settings.py"
    )


def test_every_setting_reads_its_documented_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(env_name("home"), str(tmp_path))
    monkeypatch.setenv(env_name("ray_address"), "ray://head:10001")
    monkeypatch.setenv(env_name("http_port"), "8123")
    settings = Settings()
    assert settings.home_dir == tmp_path and settings.http_port == 8123
    assert settings.ray_address == "ray://head:10001" and env_name("ray_address") == "RAY_ADDRESS"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'prefixd.sqlite3'}"
    assert settings.resolved_blob_url == str(tmp_path / "blobs")


def test_admin_token_is_never_shown(monkeypatch):
    monkeypatch.setenv("PREFIXD_ADMIN_TOKEN", "s3cret-token")
    settings = Settings()
    assert "s3cret-token" not in repr(settings) and "s3cret-token" not in str(settings.model_dump())
    assert (
        settings.admin_token is not None
        and settings.admin_token.get_secret_value() == "s3cret-token"
    )
