"""Data, not code: model presets, dataset presets and default settings (TOML files)."""
