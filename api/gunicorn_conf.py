"""gunicorn settings of `ferry api` (`--config python:api.gunicorn_conf`): its own error log
written through Ferry's logging (JSON or text, ferry/logs.py); requests are logged by the
app itself (api/__init__.py), one line each with status, time and caller. On SIGTERM the
master stops accepting and lets requests under way finish, inside the launcher's grace."""

from ferry.logs import dict_config
from ferry.settings import get_settings

logconfig_dict = dict_config()
accesslog = None
graceful_timeout = max(1, int(get_settings().shutdown_grace_seconds) - 2)
