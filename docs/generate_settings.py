"""Regenerate docs/SETTINGS.md from the Settings class: `.venv/bin/python docs/generate_settings.py`."""

from pathlib import Path

from common.config import settings_table

HEADER = """# Settings

Every setting of prefixd, read from the environment by one class (`common/config.py`).
This file is generated from that class (`python docs/generate_settings.py`); a test fails
when they differ.

"""

if __name__ == "__main__":
    path = Path(__file__).with_name("SETTINGS.md")
    path.write_text(HEADER + settings_table())
    print("wrote", path)
