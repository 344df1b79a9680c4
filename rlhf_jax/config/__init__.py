"""Config helpers: `get_config(arg)` parsing, size presets, sections that compose."""
