"""One typed config schema for a run and every service, the same locally and in Helm.

`load_config(path, overrides)` is the only entry point services need; each section lives in
the module named for it.
"""

from asyncopd.config.loader import ConfigError, config_from_dict, dump_config, load_config
from asyncopd.config.run import RunConfig

__all__ = ["ConfigError", "RunConfig", "config_from_dict", "dump_config", "load_config"]
