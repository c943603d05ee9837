"""Configuration: one schema (schema.py), one parser/validator (parse.py), derived settings (resolve.py)."""
from tunelab.config.parse import Config, build_config, load_config, parse_cli_args, read_config_file

__all__ = ["Config", "build_config", "load_config", "parse_cli_args", "read_config_file"]
